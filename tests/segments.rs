//! Named and anonymous segments under hostile conditions, with real processes: types
//! aligned above a page, foreign pid namespaces, names re-created under a sweeper or a
//! dropping creator, and a peer truncating the shared memory object.
//!
//! Tests that sweep or list `/dev/shm` run in a private mount namespace with their own
//! tmpfs on `/dev/shm` when the machine allows it (root, `unshare`), so they neither see
//! nor disturb other programs' segments. The pid namespace test needs that too and is
//! skipped, with the reason printed, where it cannot run.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procshare::{Error, Event, Segment, Shared, ShmSafe};

use common::{join, spawn, unique_name};

const LIMIT: Duration = Duration::from_secs(20);

/// Set in the environment of a re-executed copy of this binary: what it should do instead
/// of running the test list.
const HELPER: &str = "PROCSHARE_SEGMENTS_HELPER";

fn main() {
    if let Ok(job) = std::env::var(HELPER) {
        helper(&job);
    }
    common::run(
        tests![
            a_type_aligned_above_a_page_is_aligned_in_every_mapping,
            foreign_pid_namespace_cannot_open_or_judge_a_segment,
            stale_sweep_never_removes_a_segment_recreated_under_its_name,
            dropping_the_creator_leaves_a_successors_segment_alone,
            truncating_a_named_segment_makes_open_and_list_fail_not_crash,
            identical_types_from_two_programs_share_a_segment,
            type_mismatch_names_the_users_types_and_the_fix,
        ],
        &[(
            "no_dev_shm_entries_left_behind",
            no_dev_shm_entries_left_behind,
        )],
    )
}

/// Runs in a re-executed copy of this binary; never returns.
fn helper(job: &str) -> ! {
    let (what, arg) = job.split_once(':').unwrap_or((job, ""));
    match what {
        "private-shm" => {
            // We are in a fresh mount namespace (unshare -m): give it its own /dev/shm.
            let mount = Command::new("mount")
                .args(["-t", "tmpfs", "procshare-test", "/dev/shm"])
                .status()
                .expect("running mount");
            assert!(mount.success(), "mounting a private /dev/shm failed");
            let body = PRIVATE_BODIES
                .iter()
                .find(|(name, _)| *name == arg)
                .unwrap_or_else(|| panic!("no body named {arg:?}"))
                .1;
            body();
            std::process::exit(0)
        }
        "foreign-ns" => std::process::exit(foreign_namespace_checks(arg)),
        other => panic!("unknown helper job {other:?}"),
    }
}

/// Bodies that [`in_private_dev_shm`] can run in a re-executed copy of the binary.
const PRIVATE_BODIES: &[(&str, fn())] = &[
    ("foreign_ns", foreign_ns_body),
    ("sweep", sweep_body),
    ("truncate", truncate_body),
];

/// Why namespaces cannot be used here, or `None` if they can.
fn namespaces_unavailable(pid_too: bool) -> Option<String> {
    let mut args = vec!["-m"];
    if pid_too {
        args.extend(["-pf", "--mount-proc"]);
    }
    args.push("true");
    match Command::new("unshare").args(&args).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`unshare {}` failed ({}): {} (needs root or user namespaces)",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `unshare`: {e}")),
    }
}

/// Runs the body named `body` (see [`PRIVATE_BODIES`]) in a copy of this binary inside a
/// new mount namespace with a private `/dev/shm`. Returns false, having printed why, if
/// the machine does not allow it.
fn in_private_dev_shm(body: &str) -> bool {
    if let Some(why) = namespaces_unavailable(false) {
        println!("  (no private /dev/shm: {why})");
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(&exe)
        .env(HELPER, format!("private-shm:{body}"))
        .output()
        .expect("running unshare");
    assert!(
        out.status.success(),
        "{body} in a private /dev/shm ended with {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn shm_path(name: &str) -> String {
    format!("/dev/shm/procshare.{name}")
}

// ------------------------------------------------------------------------------------------
// Alignment above a page
// ------------------------------------------------------------------------------------------

/// Meets every `ShmSafe` rule, and wants more alignment than a page gives.
#[repr(C, align(8192))]
struct Wide {
    hits: AtomicU64,
}

// SAFETY: repr(C), one atomic field, no pointers, no Drop, zero is valid.
unsafe impl ShmSafe for Wide {}

fn assert_wide_aligned(what: &str, addr: usize) {
    assert_eq!(
        addr % 8192,
        0,
        "{what}: Wide at {addr:#x} is not 8192-aligned"
    );
}

fn a_type_aligned_above_a_page_is_aligned_in_every_mapping() {
    let anon = Shared::new(Wide {
        hits: AtomicU64::new(7),
    })
    .unwrap();
    assert_wide_aligned("anonymous creator", anon.segment().as_ptr() as usize);
    assert_eq!(anon.hits.load(Ordering::Relaxed), 7);

    // Each adoption of the memfd is a new mapping at a new address.
    let adopted: Vec<Segment> = (0..4)
        .map(|_| Segment::from_fd(anon.segment().as_fd().try_clone_to_owned().unwrap()).unwrap())
        .collect();
    for s in &adopted {
        assert_wide_aligned("memfd adopted with from_fd", s.as_ptr() as usize);
    }

    let name = unique_name("wide");
    let created = Shared::create(
        &name,
        Wide {
            hits: AtomicU64::new(7),
        },
    )
    .unwrap();
    assert_wide_aligned("named creator", created.segment().as_ptr() as usize);
    // Another process opens it several times: every mapping lands somewhere else.
    let child = spawn(|| {
        let opened: Vec<Shared<Wide>> = (0..8).map(|_| Shared::open(&name).unwrap()).collect();
        for s in &opened {
            assert_wide_aligned("Shared::open", s.segment().as_ptr() as usize);
            s.hits.fetch_add(1, Ordering::Relaxed);
        }
        let untyped: Vec<Segment> = (0..4).map(|_| Segment::open(&name).unwrap()).collect();
        for s in &untyped {
            assert_wide_aligned("Segment::open", s.as_ptr() as usize);
        }
    });
    join(child, LIMIT);
    assert_eq!(created.hits.load(Ordering::Relaxed), 15);
}

// ------------------------------------------------------------------------------------------
// Foreign pid namespaces
// ------------------------------------------------------------------------------------------

fn foreign_pid_namespace_cannot_open_or_judge_a_segment() {
    if let Some(why) = namespaces_unavailable(true) {
        println!("  skipped: {why}");
        return;
    }
    assert!(in_private_dev_shm("foreign_ns"));
}

/// In a private /dev/shm, in the test's own pid namespace.
fn foreign_ns_body() {
    let live = "foreign-live";
    let dead = "foreign-dead";
    let _live = Segment::create(live, 64).unwrap();
    // A creator of our namespace that died without removing its segment.
    join(
        spawn(|| std::mem::forget(Segment::create(dead, 64).unwrap())),
        LIMIT,
    );

    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-pf", "--mount-proc"])
        .arg(&exe)
        .env(HELPER, format!("foreign-ns:{live},{dead}"))
        .output()
        .expect("running unshare");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "checks in a foreign pid namespace failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was removed from inside the other namespace...
    Segment::open(live).expect("the live creator's segment survives");
    Segment::open(dead).expect("not judged from a foreign namespace");
    // ...and from the creator's own namespace the dead creator's segment is stale.
    let removed = Segment::remove_stale().unwrap();
    assert_eq!(removed, [dead.to_owned()]);
}

/// Runs as pid 1 of a new pid namespace; returns the exit code.
fn foreign_namespace_checks(arg: &str) -> i32 {
    let (live, dead) = arg.split_once(',').expect("two names");
    let mut failures = Vec::new();
    let list = Segment::list().unwrap();
    for name in [live, dead] {
        match list.iter().find(|i| i.name == name) {
            None => failures.push(format!("{name}: not listed")),
            Some(info) => {
                println!("  listed from a foreign namespace: {info:?}");
                if info.creator_alive.is_some() || info.is_stale() {
                    failures.push(format!(
                        "{name}: judged from a foreign pid namespace (creator_alive {:?}, stale \
                         {}), should be \"cannot tell\"",
                        info.creator_alive,
                        info.is_stale()
                    ));
                }
            }
        }
    }
    let removed = Segment::remove_stale().unwrap();
    for name in [live, dead] {
        if removed.iter().any(|r| r == name) {
            failures.push(format!(
                "remove_stale in a foreign pid namespace removed {name}"
            ));
        }
    }
    match Segment::open(live) {
        Ok(_) => failures.push(format!("opened {live} from a foreign pid namespace")),
        Err(e) => {
            let msg = e.to_string();
            println!("  open from a foreign namespace: {msg}");
            if !matches!(e, Error::ForeignPidNamespace { .. }) || !msg.contains("--pid=host") {
                failures.push(format!("not a clear ForeignPidNamespace error: {msg}"));
            }
        }
    }
    for f in &failures {
        println!("  FAILURE: {f}");
    }
    i32::from(!failures.is_empty())
}

// ------------------------------------------------------------------------------------------
// Removing only what was judged
// ------------------------------------------------------------------------------------------

fn stale_sweep_never_removes_a_segment_recreated_under_its_name() {
    if !in_private_dev_shm("sweep") {
        sweep_body();
    }
}

fn sweep_body() {
    const NAMES: usize = 3000;
    // One header of a creator that exited without removing its segment, copied to many names.
    let proto = unique_name("sweep-proto");
    join(
        spawn(|| std::mem::forget(Segment::create(&proto, 64).unwrap())),
        LIMIT,
    );
    let stale_bytes = std::fs::read(shm_path(&proto)).unwrap();
    let names: Vec<String> = (0..NAMES)
        .map(|i| unique_name(&format!("sweep-{i:05}")))
        .collect();
    for n in &names {
        std::fs::write(shm_path(n), &stale_bytes).unwrap();
    }

    let started = Shared::new(Event::new()).unwrap();
    let swept = Shared::new(AtomicU64::new(0)).unwrap();
    let sweeper = spawn(|| {
        started.set();
        let removed = Segment::remove_stale().unwrap();
        swept.store(removed.len() as u64, Ordering::Relaxed);
    });
    assert!(started.wait_timeout(LIMIT));
    // Meanwhile an application replaces stale segments with fresh ones of the same names,
    // the usual "remove whatever is there, then create" start-up.
    let mut mine = Vec::new();
    for (i, n) in names.iter().enumerate().rev() {
        let _ = Segment::remove(n);
        let seg = Segment::create(n, 64).unwrap();
        // SAFETY: the data area is 64 bytes, 64-aligned, and only this process writes it.
        unsafe { seg.as_ptr().cast::<u64>().write(i as u64 + 1) };
        mine.push((i, seg));
    }
    join(sweeper, LIMIT);
    println!(
        "  the sweeper removed {} stale names while {} were re-created",
        swept.load(Ordering::Relaxed),
        mine.len()
    );
    let lost: Vec<&str> = mine
        .iter()
        .filter(|(i, _)| match Segment::open(&names[*i]) {
            // SAFETY: a 64-byte data area; the marker was written before this open.
            Ok(s) => (unsafe { s.as_ptr().cast::<u64>().read() }) != *i as u64 + 1,
            Err(_) => true,
        })
        .map(|(i, _)| names[*i].as_str())
        .collect();
    assert!(
        lost.is_empty(),
        "the sweep removed {} of {} live segments re-created under stale names, e.g. {:?}",
        lost.len(),
        mine.len(),
        &lost[..lost.len().min(3)]
    );
    drop(mine);
    let _ = Segment::remove(&proto);
}

fn dropping_the_creator_leaves_a_successors_segment_alone() {
    let name = unique_name("successor");
    let created = Shared::new(Event::new()).unwrap();
    let go = Shared::new(Event::new()).unwrap();
    let creator = spawn(|| {
        let seg = Segment::create(&name, 64).unwrap();
        created.set();
        assert!(go.wait_timeout(LIMIT));
        drop(seg);
    });
    assert!(created.wait_timeout(LIMIT));
    // Someone removes the name and a successor takes it while the first creator still runs.
    Segment::remove(&name).unwrap();
    let successor = Segment::create(&name, 64).unwrap();
    go.set();
    join(creator, LIMIT);
    assert!(
        Segment::open(&name).is_ok(),
        "the first creator's drop removed its successor's segment"
    );
    drop(successor);
    assert!(matches!(
        Segment::open(&name),
        Err(Error::SegmentNotFound { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// Truncation
// ------------------------------------------------------------------------------------------

fn truncating_a_named_segment_makes_open_and_list_fail_not_crash() {
    if !in_private_dev_shm("truncate") {
        truncate_body();
    }
}

fn truncate_body() {
    let name = unique_name("truncated");
    let seg = Segment::create(&name, 10_000).unwrap();
    let path = shm_path(&name);
    let image = std::fs::read(&path).unwrap();
    let full = image.len() as u64;
    // A peer with write access keeps truncating the object to nothing and restoring it.
    let truncator = spawn(|| {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        loop {
            f.set_len(0).unwrap();
            f.set_len(full).unwrap();
            f.write_all_at(&image[..4096], 0).unwrap();
        }
    });
    let mut prober = spawn(|| {
        let until = Instant::now() + Duration::from_millis(1500);
        let (mut opened, mut refused) = (0u32, 0u32);
        while Instant::now() < until {
            for _ in 0..20 {
                match Segment::open_timeout(&name, Duration::ZERO) {
                    Ok(_) => opened += 1,
                    Err(_) => refused += 1,
                }
            }
            let _ = Segment::list().unwrap();
        }
        println!("  opened {opened} times, refused {refused} times");
    });
    let outcome = prober.join_timeout(LIMIT);
    truncator.kill().unwrap();
    let _ = truncator.join();
    drop(seg);
    match outcome {
        Ok(()) => {}
        Err(procshare::ProcessError::Timeout) => panic!("prober still running after {LIMIT:?}"),
        Err(e) => panic!("a process opening and listing a segment being truncated failed: {e}"),
    }
}

fn no_dev_shm_entries_left_behind() {
    let prefix = common::run_prefix();
    let left: Vec<_> = Segment::list()
        .unwrap()
        .into_iter()
        .filter(|i| i.name.starts_with(&prefix))
        .map(|i| i.name)
        .collect();
    assert!(left.is_empty(), "segments left in /dev/shm: {left:?}");
}

// Two programs that each define the same `#[repr(C)] struct Stats` (here: two modules,
// whose `type_name`s differ by module path exactly as two binaries' do).
mod program_a {
    #[repr(C)]
    pub struct Stats {
        pub hits: std::sync::atomic::AtomicU64,
        pub misses: std::sync::atomic::AtomicU64,
    }
    // SAFETY: repr(C), atomics only, no pointers, no Drop, zero is valid.
    unsafe impl procshare::ShmSafe for Stats {}

    #[repr(C)]
    pub struct Renamed(pub u64);
    // SAFETY: repr(C), one integer.
    unsafe impl procshare::ShmSafe for Renamed {
        const SHM_NAME: &'static str = "acme.Counter";
    }
}

mod program_b {
    #[repr(C)]
    pub struct Stats {
        pub hits: std::sync::atomic::AtomicU64,
        pub misses: std::sync::atomic::AtomicU64,
    }
    // SAFETY: repr(C), atomics only, no pointers, no Drop, zero is valid.
    unsafe impl procshare::ShmSafe for Stats {}

    #[repr(C)]
    pub struct Counter(pub u64);
    // SAFETY: repr(C), one integer.
    unsafe impl procshare::ShmSafe for Counter {
        const SHM_NAME: &'static str = "acme.Counter";
    }

    /// Same name as program A's, another layout.
    #[repr(C)]
    pub struct Wider {
        pub a: u64,
        pub b: u64,
        pub c: u64,
    }
    // SAFETY: repr(C), integers only.
    unsafe impl procshare::ShmSafe for Wider {}
}

fn identical_types_from_two_programs_share_a_segment() {
    let name = unique_name("stats-shared");
    let a = Shared::create(
        &name,
        program_a::Stats {
            hits: AtomicU64::new(3),
            misses: AtomicU64::new(1),
        },
    )
    .unwrap();
    let child = spawn(|| {
        let b = Shared::<program_b::Stats>::open(&name).expect("the same struct opens");
        b.hits.fetch_add(1, Ordering::SeqCst);
    });
    join(child, Duration::from_secs(10));
    assert_eq!(a.hits.load(Ordering::SeqCst), 4);

    // Differently named types agree through SHM_NAME.
    let name = unique_name("renamed");
    let _a = Shared::create(&name, program_a::Renamed(7)).unwrap();
    assert_eq!(Shared::<program_b::Counter>::open(&name).unwrap().0, 7);
}

fn type_mismatch_names_the_users_types_and_the_fix() {
    let name = unique_name("stats-mismatch");
    let _a = Shared::create(
        &name,
        program_a::Stats {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        },
    )
    .unwrap();
    let Err(err) = Shared::<program_b::Wider>::open(&name) else {
        panic!("a 24-byte type opened a segment holding a 16-byte one");
    };
    let text = err.to_string();
    assert!(matches!(err, Error::TypeMismatch { .. }), "{text}");
    assert!(
        text.contains("Stats (size 16")
            && text.contains("Wider (size 24")
            && text.contains("SHM_NAME"),
        "{text}"
    );
    assert!(!text.contains("program_a"), "no module paths: {text}");

    let name = unique_name("value-mismatch");
    let _v = procshare::Value::create(&name, 5u64).unwrap();
    let Err(err) = procshare::Value::<u32>::open(&name) else {
        panic!("Value<u32> opened a Value<u64>");
    };
    let text = err.to_string();
    assert!(
        text.contains("Value<u64>") && text.contains("Value<u32>") && !text.contains("procshare::"),
        "{text}"
    );
    let name = unique_name("array-mismatch");
    let _arr = procshare::Array::create(&name, &[1u16, 2]).unwrap();
    let Err(err) = procshare::Array::<i16>::open(&name) else {
        panic!("Array<i16> opened an Array<u16>");
    };
    let text = err.to_string();
    assert!(
        text.contains("Array<u16>") && text.contains("Array<i16>"),
        "{text}"
    );
}
