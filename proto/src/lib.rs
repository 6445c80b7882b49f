//! respwatch.v1
