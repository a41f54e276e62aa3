//! Namespaces, mounts and user ids for the tests that hide processes from each other.
//! Every function acts on the calling (forked) test process only.

use std::ffi::CStr;

/// Whether the tests run as root (namespaces, mounts and `setuid` need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Says why a test did nothing.
pub fn skip(test: &str, why: &str) {
    println!("    skipped {test}: {why}");
}

/// Panics with the OS error unless `rc` is 0.
pub fn check(rc: libc::c_int, what: &str) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Mounts `fstype` with `options` on `/proc` in the caller's mount namespace, made
/// private first so nothing propagates out.
pub fn mount_on_proc(fstype: &CStr, options: &CStr) {
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them; the caller owns
    // its mount namespace.
    unsafe {
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "make / private",
        );
        check(
            libc::mount(
                fstype.as_ptr(),
                c"/proc".as_ptr(),
                fstype.as_ptr(),
                0,
                options.as_ptr().cast(),
            ),
            "mount on /proc",
        );
    }
}

/// A private mount namespace with `fstype` (`proc` with `hidepid=2`, or `tmpfs` for
/// "no /proc") mounted on `/proc`.
pub fn remount_proc(fstype: &CStr, options: &CStr) {
    // SAFETY: plain syscall; the caller owns the namespace it creates.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNS) },
        "unshare(CLONE_NEWNS)",
    );
    mount_on_proc(fstype, options);
}

/// Gives up root for uid/gid 65534 (nobody), for good.
pub fn become_nobody() {
    // SAFETY: plain syscalls.
    unsafe {
        check(libc::setgid(65534), "setgid");
        check(libc::setuid(65534), "setuid");
    }
}

/// Moves the caller's future children into a new pid namespace whose pid 1 mounts
/// `fstype` on `/proc` (`proc`: what `unshare -pf --mount-proc` does; `tmpfs`: no
/// `/proc`), runs `f` there and returns whether it succeeded.
pub fn in_new_pid_namespace_with_proc(fstype: &'static CStr, f: impl FnOnce()) -> bool {
    // SAFETY: plain syscall; the caller owns the namespaces it creates.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) },
        "unshare(CLONE_NEWPID | CLONE_NEWNS)",
    );
    let child = super::spawn(|| {
        mount_on_proc(fstype, c"");
        f();
    });
    super::succeeded(&child.join())
}

/// [`in_new_pid_namespace_with_proc`] with a real `/proc`.
pub fn in_new_pid_namespace(f: impl FnOnce()) -> bool {
    in_new_pid_namespace_with_proc(c"proc", f)
}
