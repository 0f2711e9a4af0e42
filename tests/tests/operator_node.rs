//! What an operator running a node sees: quiet logs for operations the node does not
//! implement, plain-text log files, and a clean unmount on every terminating signal.

use std::process::Command;
use system_tests::*;

/// Python's `open` asks every file whether it is a terminal (`ioctl(TCGETS)`): the node
/// answers `ENOTTY`, as a local file system does, and logs nothing about it.
#[test]
fn unimplemented_ioctls_answer_enotty_quietly() {
    let c = Cluster::start("quietops", 1);
    let n = &c.nodes[0];
    write(&n.p("t.txt"), b"hello\n");
    let script = r#"
import errno, fcntl, os, sys, termios
p = sys.argv[1]
for _ in range(50):
    with open(p) as f:
        f.read()
fd = os.open(p, os.O_RDONLY)
assert not os.isatty(fd)
try:
    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
    print("ioctl succeeded")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(n.p("t.txt")).output().expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ENOTTY");
    // And `cp` (copy_file_range), `fallocate` and SEEK_DATA take their fallbacks quietly.
    let copied = n.p("copy.txt");
    assert!(Command::new("cp").arg(n.p("t.txt")).arg(&copied).status().unwrap().success());
    assert_eq!(read(&copied).as_deref(), Some(&b"hello\n"[..]));
    let _ = Command::new("fallocate").args(["-l", "4096"]).arg(n.p("fa.bin")).status();
    let log = std::fs::read_to_string(&n.log).unwrap();
    for noise in ["Not Implemented", "ioctl", "copy_file_range", "fallocate"] {
        assert!(!log.contains(noise), "the node's log mentions {noise:?}:\n{log}");
    }
}

/// Log files get no ANSI colour codes (the node's stderr is a file here, not a terminal).
#[test]
fn log_files_carry_no_colour_codes() {
    let c = Cluster::start("nocolour", 1);
    write(&c.nodes[0].p("x"), b"x");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("INFO"), "the node logged nothing at info:\n{log}");
    assert!(!log.contains('\x1b'), "the node's log has escape codes:\n{log:?}");
    let mlog = std::fs::read_to_string(&c.manager.log).unwrap();
    assert!(!mlog.contains('\x1b'), "the manager's log has escape codes:\n{mlog:?}");
}

/// Closing the terminal (SIGHUP) or Ctrl-\ (SIGQUIT) ends the node like SIGTERM: it
/// unmounts, exits with success, and keeps what was written.
#[test]
fn every_terminating_signal_unmounts() {
    let mut c = Cluster::start("signals", 1);
    for (name, sig) in [("SIGHUP", libc::SIGHUP), ("SIGQUIT", libc::SIGQUIT), ("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
        let n = &mut c.nodes[0];
        let file = format!("before-{name}.txt");
        write(&n.p(&file), name.as_bytes());
        let status = n.signal_and_wait(sig);
        assert!(status.success(), "after {name} the node exited with {status:?}");
        assert!(!is_mounted(&n.mount), "after {name} the mount is still there");
        std::fs::read_dir(&n.mount).unwrap_or_else(|e| panic!("after {name} the mount point is unusable: {e}"));
        n.restart();
        assert_eq!(read(&n.p(&file)).as_deref(), Some(name.as_bytes()), "{file} after the restart");
    }
}
