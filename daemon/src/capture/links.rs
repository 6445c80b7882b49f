//! Whether our programs are still attached. Their cgroup links are file descriptors of this
//! process; anyone with CAP_BPF and CAP_NET_ADMIN can still detach one from outside
//! (`bpftool link detach`), which leaves the descriptor open but pointing at no cgroup.
//! `/proc/self/fdinfo` shows each link's program and cgroup.
use std::{collections::HashSet, fs, io};

/// Ids of the programs whose cgroup links this process holds and that still point at a cgroup.
pub(super) fn attached_program_ids() -> io::Result<HashSet<u32>> {
    let mut attached = HashSet::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        let fd = entry?.file_name();
        let Ok(target) = fs::read_link(format!("/proc/self/fd/{}", fd.to_string_lossy())) else {
            continue; // closed since the listing
        };
        if target.as_os_str() != "anon_inode:bpf_link" {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        if let Some(program) = live_cgroup_link(&info) {
            attached.insert(program);
        }
    }
    Ok(attached)
}

/// The program id of a cgroup link's fdinfo, when the link still points at a cgroup.
fn live_cgroup_link(fdinfo: &str) -> Option<u32> {
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if field("link_type")? != "cgroup" || field("cgroup_id")?.parse::<u64>().ok()? == 0 {
        return None;
    }
    field("prog_id")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ATTACHED: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t20\nlink_type:\tcgroup\n\
                            link_id:\t3804\nprog_tag:\t6daa73fc26170643\nprog_id:\t6175\n\
                            cgroup_id:\t1\nattach_type:\t0\n";

    #[test]
    fn a_link_detached_from_outside_points_at_no_cgroup() {
        assert_eq!(live_cgroup_link(ATTACHED), Some(6175));
        let detached = ATTACHED.replace("cgroup_id:\t1", "cgroup_id:\t0");
        assert_eq!(live_cgroup_link(&detached), None);
        let other_kind = ATTACHED.replace("link_type:\tcgroup", "link_type:\ttracing");
        assert_eq!(live_cgroup_link(&other_kind), None);
        assert_eq!(live_cgroup_link("garbage"), None);
    }
}
