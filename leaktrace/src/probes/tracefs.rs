//! tracefs: where the kernel lists its tracepoints and the layout of each one's record.

use std::path::Path;

use crate::error::{Error, Result};

/// Where the kernel's tracepoints are listed; a fresh machine may not have it mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Fails with how to mount tracefs when it is not mounted.
pub fn require() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        Ok(())
    } else {
        Err(Error::Bpf(format!(
            "tracepoints need tracefs at {TRACEFS}: mount -t tracefs nodev {TRACEFS}"
        )))
    }
}

/// The offset of `field` in the records of tracepoint `category:event`, from its format file.
///
/// Record layouts change between kernels: `sched_process_fork` named its processes with
/// `char[16]` arrays in older kernels (`child_pid` at 44) and with `__data_loc` strings in
/// newer ones (at 20, as on 6.18).
pub fn field_offset(category: &str, event: &str, field: &str) -> Option<u32> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(event)
        .join("format");
    parse_field_offset(&std::fs::read_to_string(path).ok()?, field)
}

/// The offset of `field` in a tracepoint format file's text.
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit(' ').next()?.split('[').next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_in_both_fork_layouts() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                   \tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                   \tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(old, "pid"), None);
    }

    #[test]
    fn reads_this_kernels_fork_record() {
        if require().is_err() {
            return;
        }
        let off = field_offset("sched", "sched_process_fork", "child_pid");
        assert!(matches!(off, Some(20 | 44)), "{off:?}");
    }
}
