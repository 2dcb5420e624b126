//! How a verified guest's disks are printed, the same for every guest kind and command.

use crate::guest::file::disks::verify::DiskVerifyReport;

/// The `verify` commands' disk line.
pub fn disks_line(d: &DiskVerifyReport) -> String {
    format!(
        "ok disks={} disk_workload={} written_blocks={} writes={} checkpoints={}",
        d.disks,
        d.kind.name(),
        d.written_blocks,
        d.writes,
        d.checkpoints
    )
}

/// The disks' part of a run's or a resume's summary line (empty without disks).
pub fn disks_summary(d: Option<&DiskVerifyReport>) -> String {
    d.map_or_else(String::new, |d| {
        format!(
            " disks={} disk_writes={} disk_written_blocks={}",
            d.disks, d.writes, d.written_blocks
        )
    })
}
