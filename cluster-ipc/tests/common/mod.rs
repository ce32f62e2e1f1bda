//! Fd helpers shared by cluster-ipc's unit and integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;

/// The fds open in this process.
pub fn open_fds() -> BTreeSet<i32> {
    let names: Vec<i32> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    // The directory's own fd is closed once the iterator is gone, so it is the one entry whose
    // link no longer resolves.
    names
        .into_iter()
        .filter(|fd| fs::read_link(format!("/proc/self/fd/{fd}")).is_ok())
        .collect()
}

/// Inode of the open file behind `fd` (fstat through a dup): fds are renumbered in transit,
/// inodes are not.
pub fn ino(fd: BorrowedFd<'_>) -> u64 {
    File::from(fd.try_clone_to_owned().unwrap())
        .metadata()
        .unwrap()
        .ino()
}
