//! Ignore rules on real mounts (issue 16): `.syncignore` files in gitignore syntax,
//! nested, with negation; a rule added later and a rule removed later; `syncctl ignored`
//! and the status count. An ignored path is not sent; "not sent" is checked after a
//! later file of the same node arrived (a node's changes arrive in order).

use std::time::Duration;
use system_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// Writes an empty marker on `from` and waits until `to` has it: everything `from` sent
/// before has arrived.
fn barrier(from: &NodeProc, to: &NodeProc, name: &str) {
    write(&from.p(name), b"");
    eventually(&format!("{name} to reach {}", to.id), WAIT, || to.p(name).exists());
}

#[test]
fn ignored_paths_stay_on_their_node_and_rule_changes_take_effect_at_once() {
    let c = Cluster::start("ignore", 2);
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    write(&a.p(".syncignore"), b"*.o\nbuild/\n");
    std::fs::create_dir_all(a.p("src")).unwrap();
    write(&a.p("src/.syncignore"), b"!keep.o\n*.tmp\n");
    write(&a.p("x.log"), b"log 1");
    c.converged();
    assert_eq!(read(&b.p("src/.syncignore")).unwrap(), b"!keep.o\n*.tmp\n", "rules files sync");

    write(&a.p("src/main.o"), b"object");
    write(&a.p("src/main.c"), b"source");
    write(&a.p("src/keep.o"), b"kept by a negation");
    write(&a.p("src/s.tmp"), b"nested rule");
    write(&a.p("s.tmp"), b"not ignored above src");
    std::fs::create_dir_all(a.p("build/out")).unwrap();
    write(&a.p("build/out/bin"), b"binary");
    barrier(a, b, "m1");
    assert_eq!(read(&b.p("src/main.c")).unwrap(), b"source");
    assert_eq!(read(&b.p("src/keep.o")).unwrap(), b"kept by a negation");
    assert_eq!(read(&b.p("s.tmp")).unwrap(), b"not ignored above src");
    for p in ["src/main.o", "src/s.tmp", "build"] {
        assert!(!b.p(p).exists(), "{p} is ignored on a, and must not reach b");
    }

    // What another node has at an ignored path is its own: never overwritten.
    write(&b.p("src/main.o"), b"b's own object");
    write(&a.p("src/main.o"), b"a's object, edited");
    barrier(a, b, "m2");
    barrier(b, a, "m3");
    assert_eq!(read(&b.p("src/main.o")).unwrap(), b"b's own object");
    assert_eq!(read(&a.p("src/main.o")).unwrap(), b"a's object, edited");

    // The node tells what it ignores.
    let (ok, out, err) = a.syncctl(&["ignored"]);
    assert!(ok, "syncctl ignored: {err}");
    let listed: Vec<&str> = out.lines().collect();
    let expect: Vec<String> = ["build", "src/main.o", "src/s.tmp"].iter().map(|p| a.p(p).display().to_string()).collect();
    assert_eq!(listed, expect);
    let (ok, out, _) = a.syncctl(&["ignored", &a.p("src").display().to_string()]);
    assert!(ok && out.lines().count() == 2, "below src: {out}");
    let (_, status, _) = a.syncctl(&["status"]);
    assert!(status.contains("ignored:   3 path(s)"), "{status}");

    // A rule added later: x.log stays where it is on both nodes; a's later edit of it
    // is not sent.
    write(&a.p(".syncignore"), b"*.o\nbuild/\n*.log\n");
    barrier(a, b, "m4");
    assert_eq!(read(&b.p(".syncignore")).unwrap(), b"*.o\nbuild/\n*.log\n");
    write(&a.p("x.log"), b"log 2");
    barrier(a, b, "m5");
    assert_eq!(read(&b.p("x.log")).unwrap(), b"log 1", "a path that became ignored stays where it was");

    // Rules removed later: what they ignored on a is sent now (build/ and the log on a;
    // b's own src/main.o went unsent by b as well, and b's rules are the same file).
    write(&a.p(".syncignore"), b"*.o\n");
    eventually("build/out/bin and the edited log to reach b", WAIT, || {
        read(&b.p("build/out/bin")).as_deref() == Some(b"binary") && read(&b.p("x.log")).as_deref() == Some(b"log 2")
    });
    assert!(!b.p("src/s.tmp").exists(), "the nested rule still holds");
    let (_, out, _) = a.syncctl(&["ignored"]);
    assert_eq!(out.lines().count(), 2, "src/main.o and src/s.tmp: {out}");
}
