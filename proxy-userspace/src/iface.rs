//! Interface discovery in the current network namespace.
//!
//! Uses if_nameindex(3) (netlink under the hood) rather than /sys/class/net, because sysfs shows
//! the namespace it was mounted in, not the one this process may have entered.

use std::ffi::CStr;

/// Names of every interface in this process's network namespace.
pub fn list() -> std::io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut cur = head;
    // SAFETY: walking the array up to its terminator; names are NUL-terminated C strings.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            names.push(
                CStr::from_ptr((*cur).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(names)
}

/// Interfaces matching any of the glob patterns, sorted.
pub fn matching(patterns: &[glob::Pattern]) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = list()?
        .into_iter()
        .filter(|n| patterns.iter().any(|p| p.matches(n)))
        .collect();
    names.sort();
    Ok(names)
}
