//! QEMU guests: a VM QEMU runs whose RAM is shared memory files (one per RAM backend).
//! vmstream moves the RAM files; QEMU moves the device state (`x-ignore-shared`). [`qmp`]
//! talks to QEMU's monitor, [`source`] is the source side ([`QemuSourceGuest`]), [`throttle`]
//! slows its vCPU threads alone (by a cpu cgroup, or [`ptrace_throttle`]'s per-thread stops).

pub mod ptrace_throttle;
pub mod qmp;
pub mod source;
pub mod throttle;

pub use qmp::{Qmp, QmpError, QmpEvent};
pub use source::{QemuAfter, QemuSourceGuest, QemuSpec};

use serde_json::{json, Value};
use std::path::PathBuf;

/// One memory backend of a VM, as QMP describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBackend {
    /// Its QOM id (`-object memory-backend-file,id=...`).
    pub id: String,
    /// Bytes.
    pub size: u64,
    /// Whether it is mapped shared (`share=on`): only such a file can be moved by another
    /// process.
    pub share: bool,
    /// Its file (`mem-path`), None for a backend that is not a file.
    pub mem_path: Option<PathBuf>,
}

/// The VM's memory backends (`query-memdev`, and `qom-get .../mem-path` for each).
pub fn ram_backends(qmp: &mut Qmp) -> Result<Vec<RamBackend>, QmpError> {
    let list = qmp.execute("query-memdev", Value::Null)?;
    let bad = || QmpError::Reply {
        command: "query-memdev".into(),
        reply: list.to_string(),
    };
    let mut out = Vec::new();
    for m in list.as_array().ok_or_else(bad)? {
        let id = m
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(bad)?
            .to_string();
        let size = m.get("size").and_then(Value::as_u64).ok_or_else(bad)?;
        let share = m.get("share").and_then(Value::as_bool).unwrap_or(false);
        let mem_path = qmp
            .execute(
                "qom-get",
                json!({ "path": format!("/objects/{id}"), "property": "mem-path" }),
            )
            .ok()
            .and_then(|v| v.as_str().map(PathBuf::from));
        out.push(RamBackend {
            id,
            size,
            share,
            mem_path,
        });
    }
    Ok(out)
}
