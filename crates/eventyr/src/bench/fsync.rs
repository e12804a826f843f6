//! The disk's fsync rate, measured the way `pg_test_fsync` does: rewrite the same 8 KiB
//! at the start of a file and `fdatasync` it, in a loop, for a fixed time. Closed-loop
//! writers that each wait for their own flush can go no faster than this.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FsyncRate {
    pub per_second: f64,
    pub mean_micros: f64,
}

pub fn measure(dir: &Path, duration: Duration) -> std::io::Result<FsyncRate> {
    let path = dir.join("fsync-probe");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5a_u8; 8192];
    file.write_all_at(&block, 0)?;
    file.sync_all()?;
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        count += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(FsyncRate {
        per_second: count as f64 / elapsed,
        mean_micros: elapsed * 1e6 / count.max(1) as f64,
    })
}
