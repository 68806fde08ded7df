//! Is the target a CPython process, where does its interpreter live, which version is it?

use std::path::PathBuf;

use super::elf::ElfFile;
use super::maps::ModuleMap;

/// Where a process's CPython runtime is and what it is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PythonInfo {
    /// The file holding the interpreter, as the process sees it (libpython or the executable).
    pub module: String,
    /// The same file through `/proc/PID/root`.
    #[serde(skip)]
    pub host_path: PathBuf,
    /// `true` for a shared libpython, `false` for an interpreter linked into the executable.
    pub shared: bool,
    /// (major, minor, micro), from `_Py_Version` or the library name.
    pub version: Option<(u8, u8, u8)>,
}

impl PythonInfo {
    /// "3.11.7", or "3.11" when only the library name was known, or "unknown".
    pub fn version_string(&self) -> String {
        match self.version {
            Some((a, b, c)) if c != u8::MAX => format!("{a}.{b}.{c}"),
            Some((a, b, _)) => format!("{a}.{b}"),
            None => "unknown".into(),
        }
    }
}

/// Symbols only a CPython interpreter defines.
const INTERPRETER_SYMBOLS: &[&str] = &["_PyRuntime", "Py_Initialize", "_Py_Version"];

/// Finds the CPython runtime of process `pid` from its mappings and executable.
pub fn detect(pid: u32, modules: &ModuleMap, exe: Option<&str>) -> Option<PythonInfo> {
    let lib = modules.files().into_iter().find(|f| {
        f.rsplit('/')
            .next()
            .is_some_and(|b| b.starts_with("libpython3"))
    });
    let (module, shared) = match lib {
        Some(l) => (l.to_string(), true),
        None => {
            let exe = exe?;
            let elf = ElfFile::open(&modules.host_path(pid, exe)).ok()?;
            if !elf.has_any_symbol(INTERPRETER_SYMBOLS) {
                return None;
            }
            (exe.to_string(), false)
        }
    };
    let hp = modules.host_path(pid, &module);
    let version = ElfFile::open(&hp)
        .ok()
        .and_then(|elf| elf.object_bytes("_Py_Version", 4))
        .and_then(|b| decode_hexversion(u32::from_le_bytes(b.try_into().ok()?)))
        .or_else(|| version_from_name(&module));
    Some(PythonInfo {
        module,
        host_path: hp,
        shared,
        version,
    })
}

/// Decodes `PY_VERSION_HEX` (0x030B07F0 is 3.11.7 final).
pub fn decode_hexversion(v: u32) -> Option<(u8, u8, u8)> {
    let major = (v >> 24) as u8;
    (major == 3).then_some((major, (v >> 16) as u8, (v >> 8) as u8))
}

/// "libpython3.12.so.1.0" or "python3.11" → (3, 12, unknown micro).
pub fn version_from_name(path: &str) -> Option<(u8, u8, u8)> {
    let base = path.rsplit('/').next()?;
    let rest = base
        .strip_prefix("libpython")
        .or_else(|| base.strip_prefix("python"))?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major: u8 = parts.next()?.parse().ok()?;
    let minor: u8 = parts.next()?.parse().ok()?;
    (major == 3).then_some((major, minor, u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_hex_and_names() {
        assert_eq!(decode_hexversion(0x030B07F0), Some((3, 11, 7)));
        assert_eq!(decode_hexversion(0x020718F0), None);
        assert_eq!(
            version_from_name("/usr/lib/libpython3.12.so.1.0"),
            Some((3, 12, u8::MAX))
        );
        assert_eq!(
            version_from_name("/usr/bin/python3.11"),
            Some((3, 11, u8::MAX))
        );
        assert_eq!(version_from_name("/usr/lib/libc.so.6"), None);
    }
}
