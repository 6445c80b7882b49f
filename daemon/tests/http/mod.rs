//! A plain HTTP GET for the tests that scrape `/metrics` (or ask Prometheus).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// GET `path` from `addr` (`host:port`); returns the body, panics on anything but 200.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "GET {addr}{path}: {head}");
    body.to_owned()
}
