//! Seeds that once failed, kept: each found a real bug (or a wrong check), now fixed.
//! And the evidence that the simulator can fail: two past bugs put back into the nodes
//! are each found within the first few thousand seeds (CI runs 20,000).

use fs_node::env::PastBug;

fn run(seed: u64, bug: Option<PastBug>) -> Result<sim::RunStats, String> {
    run_with(seed, sim::Config { bug, ..Default::default() })
}

fn run_with(seed: u64, cfg: sim::Config) -> Result<sim::RunStats, String> {
    sim::run_seed(seed, cfg).map_err(|(what, trace)| format!("seed {seed}: {what}\n{}", trace.join("\n")))
}

/// (seed, what it found).
const KEPT: &[(u64, &str)] = &[
    (179, "files written offline below a directory that became a file elsewhere were refused and lost"),
    (236, "a node kept its version after its change was refused at the revision it had; a file put over a directory with new files was refused and lost"),
    (407, "a file renamed while being written, the node killed before the last close, was never sent"),
    (5827, "the check took a write for closed while another writer of the file, renamed, was still open"),
    (274, "a chmod of a file being written was lost when the node died"),
    (2069, "a directory the manager brought back took a default mode, and the node's chmod of it was dropped as stale"),
    (3798, "a later edit of a change kept as a conflict file conflicted with the node's own version"),
    (17674, "a change following a refused one lost its base and conflicted with the node's own version"),
    (33913, "a later edit of a change kept as a conflict replaced a conflict directory, leaving files below a file"),
    (49537, "a deleted directory kept for pending children stayed for good once those children were kept elsewhere"),
    (63011, "a directory replaced by the manager's file took with it a file still being written below it"),
    (68594, "a file whose last close could not commit (a database fault) was not sent by the next sync, only by a GC a minute later"),
    (3305, "a file made where a directory renamed in parts had been reached the manager before the deletes of what it held: refused, and the node kept its file"),
    (11280, "a directory made again for another node's entry where a directory renamed in parts had been, before the deletes of its old paths were queued, kept a default mode"),
    (22442, "the delete of a directory renamed in parts, queued when its mkdir was decided, was based on the revision from before: refused, and the node's next file there conflicted with its own change"),
    (7502, "a directory renamed in parts by a node that died: finished after its restart, the delete of an old path already queued before was queued again, and the node kept its file where the manager had put the directory back"),
    (170857, "a file made where a directory renamed in parts had been took the place of the directory's unsent chmod, ahead of the deletes of what it held: refused, and the node kept its file"),
    (5418, "a wrong check: a file the manager put into a conflict directory as the copy of the node's change of another path was taken for the node's own change there, which a directory the node renamed to that path (not knowing) was said to conflict with"),
    (252083, "a file written below a directory that had become a file elsewhere was put into the node's conflict directory for it over a directory the node had made there since, leaving a file below a file on the manager"),
    (266439, "the manager's file over a directory that a node kept for a change below it, then kept as a conflict, was never applied: the node kept the directory until some later sync"),
    (1851, "the decision of a node's edit was lost with its queue's oldest messages, the next edit's came: the node's third edit, based on the second's revision, still followed the first and was decided against the first's revision, a conflict with its own second edit"),
    (2023, "the decision of a node's edit, sent again after its queue lost the first, came with another node's later version: the node took that revision for its own, and when its next edit was kept as a conflict, it kept its own version at the path for good"),
    (17468, "a change kept as a conflict file, sent again after its node's queue lost the decision and the conflict file's broadcast, was answered with the decision alone: the node let go of the content, which no other node had, and every node tried to fetch it for good"),
    (13574, "a node's file over its own earlier directory, decided out of order, was kept as a conflict while a delete below was undecided: the manager's directory, deferred, was dropped by a sync reply that named it again and was skipped; the node kept its file"),
    (50926, "a delete deferred for a node's mkdir below it outlived the directory the manager brought back for that mkdir (lost with the node queue's oldest messages): applied once the mkdir was decided, it took the directory away with newer paths below it"),
    (63226, "the answer to a repeat of a change kept as a conflict file lost its first half (the conflict file's state) to the node queue's limit and kept the decision: the node let go of the only copy of its content, and every node tried to fetch it for good"),
    (60097, "a file written in a directory, then the directory renamed in parts and another renamed in parts to its name, before the file's put was decided: the second move's directory at the file's path was put later with the revision from before, a conflict of the node with its own file"),
    (88393, "another node's symlink over a directory, deferred for the node's change below it, outlived the delete and the directory brought back after it (both lost with the node queue's oldest messages): applied once the change below was decided, it took the directory away with newer paths below it"),
    (13755, "a connected node's queue dropped the answers to the changes it sent again for the manager's request to sync, before its sync reached the manager, which took the request for still queued and did not ask again: the changes stayed undecided for good"),
    (479, "the manager's database was lost and started anew, and decided again a change of another node before any node said it had later revisions: the node whose later state the manager lacked sent it again, it was decided as a conflict at the path's older revision, and the node, holding a higher one, never took the decision"),
    (1116, "the manager's database was brought back from a copy made after it had asked every node to sync: the nodes' sync requests were lost with it, each node gave up its sync after 120 s and never synced again, and the manager never learned of the paths"),
    (3777, "the manager's database was brought back from an older copy and gave again a revision the lost one had given, to another version of the same path: the nodes holding that revision took the new decision for one they had"),
    (12659, "a change sent again when the manager asked every node to sync was decided, then the manager lost its database; the node took that decision, deleted the file and let go of the content when the old version's retention ended; decided again as a conflict file, no node could serve it, and every node tried to fetch it for good"),
    (216, "a node whose first sync reply was lost with its queue's oldest messages, and a delete's broadcast with it, said in its next sync it had applied every delete up to the highest revision it took; the reply left the delete out (and the manager, forgetting deletes every node said it had applied, forgot it), and the node sent the deleted file back as new"),
    (5925, "a pull that finished after its node took a directory's delete (the deletes below it lost with the queue's oldest messages) applied a state from before the delete and made the directory again, which no delete named any more: it came back, empty, on every node"),
    (7401, "a node's first sync asked for no deletes (it had taken nothing), then it took an older broadcast from its queue and lost the delete's with the queue's oldest messages; the manager counted that sync as every delete applied and forgot the delete, and the node, having set its synced head to that reply's although it held the path back, asked for no delete before it in its catch-up sync: the deleted directory came back"),
    (86668, "a node's offline edit went, by the manager's rule, into its own earlier conflict file, whose new state the node lost with its queue's oldest messages; holding the older state, it let go of the content, and room made on a full disk took it: no node could ever fetch the conflict file"),
    (99334, "a node's queue dropped a delete; a snapshot sync that had been under way since before the node heard of the path's older state counted that state as named, though the reply (as of a later head) did not name it, and kept the retry of its content: pulled after the reply, it made the deleted file again, which the node then sent as new"),
    (91358, "the manager's database was brought back from a copy and decided a node's put again at a new revision, the decision lost with the node's queue; the node's chmod on the lost revision, the same bytes on a stale base, kept the manager's mode: the chmod was lost though nobody else had changed the mode"),
    (206769, "a node sent its mkdir and its delete of a directory again, both decisions lost with its queue; another node had made the same directory there since, and the repeat's answer (the path's state now) looked just like the node's own put, so the node took that revision as its own and never made the directory"),
    (599, "a wrong check: a node's edit that the manager put into the node's own conflict file for the path (a later edit of a change kept as a conflict), which the node's touch of that conflict file then met, was taken for the node's own change there"),
    (15533, "a node's touch of bytes written elsewhere since, merged as unchanged, was recorded at the path's revision now: the node's next touch, which followed it, was based on the other node's revision, and the node's older bytes replaced the other node's write without a conflict"),
    (16472, "a node's chmod of bytes written elsewhere since, merged onto them, kept the writer as the state's origin: the writer's next write, stale against the chmod, was taken for a conflict with its own change"),
    (6039, "a node's chmod of bytes written elsewhere since, merged onto them with the chmodding node as the state's origin: that node's next touch, decided against its base (whose history was forgotten), was taken for a conflict with its own change"),
    (241679, "after the manager's database was brought back from a copy, a broadcast the lost database had made (another node's file where a directory is) came to a node after a file below that directory made since; applied, it took the newer file away and left its revision taken, so no later state of it made it again"),
    (1969, "a wrong check: a node's chmod lost to another node's chmod of the same state that the manager had merged onto bytes written since (a state of the manager's origin, decided first) was taken for lost"),
    (2076, "another node's chmod of bytes a node had just written was merged onto them; the retention of the writer's version ended and its bytes were released while still the path's; the writer wrote over them, its write (its base's history forgotten) was kept as a conflict file, and no node could ever serve the path's bytes"),
    (530909, "a node touched its own conflict file (a new state of the same bytes), then removed it; the removal, on the state before the touch, was refused, and that state's retention had ended and released the bytes while still the path's: no node could ever serve them"),
    (549850, "a node chmodded a directory back to the mode of its own chmod still undecided, which the manager's state shown meanwhile had replaced; the change said it was made on that undecided chmod's mode, not on the mode shown, and the manager took the chmod for no change of the mode: lost"),
    (557683, "a node touched a file twice, then `mv d x/y && mv x d` (a large rename each) brought a directory to the file's path before the touches were decided; the first decision's revision was taken for a sign that the directory had been put, so the second decision did not put it, and the move put it later based on the first touch's revision: a conflict of the node with its own second touch"),
    (603090, "a node's touch was decided, then lost with the manager's database brought back from a copy; the node's chmod that followed it came with base 0 and was taken for no change of the mode, though the node said the mode it was made on: lost"),
    (1184, "(with chowns) a node's touch was decided unchanged, another node's touch came first; its chmod and chown that followed were based on that decision's revision, whose state the history had forgotten since, and the manager, not using the mode and owners the node said they were made on, took them for no change: the chown was lost"),
    (634610, "a node's chmod of a file kept as its conflict file's later edit (the manager put it at the conflict file) was decided first; the node, not having seen it, chmodded the conflict file on the state before, and the manager took the node's own earlier chmod for a concurrent one decided first: the later chmod was lost"),
    (657857, "(with chowns) a node's write came after its earlier change was decided with a chmod and chown made elsewhere, which it had not applied yet; merged against the history's state at its base, the mode and owner it never touched passed for a chmod and chown back, the chmod and chown made elsewhere were undone, and a later chown there was lost to that phantom change"),
    (661047, "(with chowns) a node chmodded and chowned a file open for writing, then died; its put, sent after the restart, did not say the mode and owners it was made on, and the manager's history had forgotten that base: the chown was taken for no change"),
    (702593, "(with chowns) a node's touch, queued after its chmod and not sent yet, was replaced by a chown once the chmod was decided; the chown went without the mode and owners it was made on, on a base the manager's history had forgotten, and was taken for no change"),
    (683815, "a node wrote over bytes of its own that nobody had pulled yet, while a chmod made elsewhere was merged onto them; the manager's history had forgotten the write's base, so the write became a conflict file, and the path was left with the older bytes, which the node no longer held: nobody could serve them"),
    (831386, "(found on a build where every change said the content it was made on) a node deleted a directory and made a file there; the file's put said it was made on its own empty content, the manager's history had forgotten the base, and the write was taken for a touch of those bytes: lost"),
    (786548, "a node's edit, kept as a conflict file, was followed by the same node's directory at the path, which the manager put over that conflict file as its later edit, with the files the node wrote below it; the node's own edit of the conflict file, still a file where it was made, was refused for the files below and lost"),
    (798153, "(with chowns) a node wrote and chowned its conflict file on a state since changed only by its own earlier changes, put there as the conflict file's updates; a write said no mode and owners it was made on, and the manager merged it as if made elsewhere: the chown was lost to the owner its own earlier change had set"),
];

/// The configurations the kept seeds replay in: each as the simulation was before a
/// feature came (seeds found then replay as found), newest last.
fn eras() -> Vec<(&'static str, sim::Config)> {
    let now = sim::Config::default();
    let no_chowns_elsewhere = sim::Config { chowns_elsewhere: false, ..now.clone() };
    let no_chmods_elsewhere = sim::Config { chmods_elsewhere: false, ..no_chowns_elsewhere.clone() };
    let no_resolutions = sim::Config { resolutions: false, ..no_chmods_elsewhere.clone() };
    let no_touches = sim::Config { touches: false, ..no_resolutions.clone() };
    let no_forget_deletes = sim::Config { forget_deletes: false, ..no_touches.clone() };
    let no_forget_decisions = sim::Config { forget_decisions: false, ..no_forget_deletes.clone() };
    let no_restores = sim::Config { restores: false, ..no_forget_decisions.clone() };
    let no_connected_drops = sim::Config { connected_drops: false, ..no_restores.clone() };
    let no_queue_drops = sim::Config { queue_drops: false, ..no_restores.clone() };
    let one_page = sim::Config { sync_page_bytes: None, ..no_queue_drops.clone() };
    let no_remade_dirs = sim::Config { remade_dirs: false, ..one_page.clone() };
    let no_frozen_holders = sim::Config { stalling_holders: false, large_moves: false, ..one_page.clone() };
    vec![
        ("before frozen holders were simulated", no_frozen_holders),
        ("before directories were made again where a large rename's had been", no_remade_dirs),
        ("before sync replies came in small pages", one_page),
        ("before node queues dropped their oldest messages", no_queue_drops),
        ("before connected nodes fell behind", no_connected_drops),
        ("before the manager's database was brought back from copies", no_restores),
        ("before the manager forgot old records and history", no_forget_decisions),
        ("before nodes forgot deleted paths' revisions", no_forget_deletes),
        ("before nodes touched files", no_touches),
        ("before nodes dealt with their conflicts", no_resolutions),
        ("before nodes chmodded files just written elsewhere", no_chmods_elsewhere),
        ("before nodes chowned files just chmodded elsewhere", no_chowns_elsewhere),
        ("as the simulation is now", now),
    ]
}

#[test]
fn seeds_that_once_failed_pass() {
    for (seed, found) in KEPT {
        for (era, cfg) in eras() {
            if let Err(e) = run_with(*seed, cfg) {
                panic!("kept seed {seed} ({found}) fails, run {era}: {e}");
            }
        }
    }
}

/// The first seed in `0..limit` that fails with `bug` put back, if any.
fn first_failure(bug: PastBug, limit: u64) -> Option<(u64, String)> {
    (0..limit).find_map(|seed| run(seed, Some(bug)).err().map(|e| (seed, e.lines().next().unwrap_or_default().to_string())))
}

#[test]
fn the_simulator_finds_the_abandoned_work_bug() {
    let found = first_failure(PastBug::AbandonedWork, 5_000);
    assert!(found.is_some(), "5,000 seeds did not find the abandoned-work bug");
    eprintln!("found: {found:?}");
}

#[test]
fn the_simulator_finds_the_decided_base_bug() {
    let found = first_failure(PastBug::DecidedBase, 2_000);
    assert!(found.is_some(), "2,000 seeds did not find the decided-base bug");
    eprintln!("found: {found:?}");
}
