//! The floor of any FUSE file system on this machine (docs/benchmarks.md, session 33): a
//! mount that keeps names and attributes in memory, throws file contents away, and
//! answers each request at once on one thread, as the node does. What a program's
//! operations cost through it is what the kernel's round trips cost, with nothing to do
//! behind them: no node can be faster than this through FUSE.
//! Usage: nullfs MOUNTPOINT   (unmounts on SIGINT/SIGTERM; `umount MOUNTPOINT` also ends it)

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// As long as the node's (`fs-node/src/fs.rs`).
const TTL: Duration = Duration::from_secs(30);

struct Node {
    attr: FileAttr,
    children: BTreeMap<OsString, u64>,
}

struct NullFs {
    nodes: Mutex<(HashMap<u64, Node>, u64)>,
}

fn new_attr(ino: u64, kind: FileType, perm: u16, uid: u32, gid: u32) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::Now => SystemTime::now(),
        TimeOrNow::SpecificTime(t) => t,
    }
}

impl NullFs {
    fn add(&self, parent: u64, name: &OsStr, kind: FileType, perm: u16, req: &Request) -> Result<FileAttr, Errno> {
        let mut g = self.nodes.lock().unwrap();
        let (nodes, next) = &mut *g;
        let p = nodes.get(&parent).ok_or(Errno::ENOENT)?;
        if p.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        *next += 1;
        let attr = new_attr(*next, kind, perm, req.uid(), req.gid());
        nodes.insert(*next, Node { attr, children: BTreeMap::new() });
        nodes.get_mut(&parent).unwrap().children.insert(name.to_owned(), *next);
        Ok(attr)
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut g = self.nodes.lock().unwrap();
        let nodes = &mut g.0;
        let ino = *nodes.get(&parent).and_then(|p| p.children.get(name)).ok_or(Errno::ENOENT)?;
        let n = &nodes[&ino];
        match (dir, n.attr.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !n.children.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        nodes.remove(&ino);
        nodes.get_mut(&parent).unwrap().children.remove(name);
        Ok(())
    }
}

impl Filesystem for NullFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let g = self.nodes.lock().unwrap();
        match g.0.get(&parent.0).and_then(|p| p.children.get(name)).and_then(|i| g.0.get(i)) {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.nodes.lock().unwrap().0.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut g = self.nodes.lock().unwrap();
        let Some(n) = g.0.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        let a = &mut n.attr;
        if let Some(m) = mode {
            a.perm = (m & 0o7777) as u16;
        }
        a.uid = uid.unwrap_or(a.uid);
        a.gid = gid.unwrap_or(a.gid);
        if let Some(s) = size {
            a.size = s;
        }
        if let Some(t) = atime {
            a.atime = time(t);
        }
        if let Some(t) = mtime {
            a.mtime = time(t);
        }
        a.ctime = SystemTime::now();
        reply.attr(&TTL, a)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.add(parent.0, name, FileType::Directory, (mode & !umask & 0o7777) as u16, req) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        match self.add(parent.0, name, FileType::RegularFile, (mode & !umask & 0o7777) as u16, req) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(a.ino.0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(ino.0), FopenFlags::empty())
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some(n) = self.nodes.lock().unwrap().0.get_mut(&ino.0) {
            n.attr.size = n.attr.size.max(offset + data.len() as u64);
        }
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(ino.0), FopenFlags::empty())
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let g = self.nodes.lock().unwrap();
        let Some(d) = g.0.get(&ino.0) else { return reply.error(Errno::ENOENT) };
        let dots = [(ino.0, FileType::Directory, OsStr::new(".")), (ino.0, FileType::Directory, OsStr::new(".."))];
        let children = d.children.iter().map(|(name, i)| (*i, g.0[i].attr.kind, name.as_os_str()));
        for (n, (i, kind, name)) in dots.into_iter().chain(children).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), n as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    // No extended attributes: the kernel stops asking (as the node answers).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS))
    }
}

fn main() {
    let mount = std::env::args().nth(1).expect("usage: nullfs MOUNTPOINT");
    let root = new_attr(1, FileType::Directory, 0o755, 0, 0);
    let fs = NullFs { nodes: Mutex::new((HashMap::from([(1, Node { attr: root, children: BTreeMap::new() })]), 1)) };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::FSName("nullfs".into()), fuser::MountOption::DefaultPermissions];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(1);
    let session = fuser::spawn_mount(fs, &mount, &cfg).expect("mounting");
    // Ends when the mount goes (umount) or on a signal.
    let (tx, rx) = std::sync::mpsc::channel();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || {
        while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = tx.send(());
    });
    let _ = rx.recv();
    let _ = std::process::Command::new("umount").arg(&mount).status();
    let _ = session.umount_and_join();
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}
