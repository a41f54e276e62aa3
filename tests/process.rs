//! The `Process` layer with real processes: values, panics, exit codes, signals, timeouts,
//! daemons, start methods and their failure modes.
//!
//! Every test runs in its own forked process under a watchdog (see `common`). `main`
//! calls `procshare::init()` first, so this binary can be re-executed by `Spawn`; the
//! `PROCESS_TEST_BEFORE_INIT` variable lets a test make such a child fail before `init()`.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use procshare::process::{Tamper, disable_pidfds, tamper_next_spawn};
use std::sync::atomic::{AtomicU64, Ordering};

use procshare::{
    Array, ByteQueue, Child, Connection, Error, Process, ProcessError, Queue, QueueError,
    QueueReceiver, QueueSender, RecvTimeoutError, Segment, Shared, StartMethod, Value,
    active_children, current_process, parent_process,
};
use serde::{Deserialize, Serialize};

const BEFORE_INIT: &str = "PROCESS_TEST_BEFORE_INIT";

fn main() {
    match std::env::var(BEFORE_INIT).as_deref() {
        Ok("exit") => std::process::exit(3),
        Ok("hang") => std::thread::sleep(Duration::from_secs(60)),
        _ => {}
    }
    procshare::init();
    common::run(
        tests![
            returns_values_of_several_types,
            panic_message_and_location_come_back,
            exit_codes_come_back,
            signals_are_reported_as_signals,
            join_timeout_is_honoured_and_the_child_keeps_running,
            try_join_and_exitcode_poll_without_blocking,
            terminate_and_kill,
            daemon_children_die_with_their_parent,
            daemon_children_die_with_their_parent_in_a_new_pid_namespace,
            fork_is_refused_with_threads_and_the_default_picks_spawn,
            spawn_handshake_mismatch_is_a_bootstrap_error,
            spawned_child_dying_before_init_is_an_error_in_time,
            value_and_queue_work_in_fork_children,
            large_results_do_not_deadlock,
            a_child_killed_mid_write_is_reported_as_a_signal,
            everything_works_without_pidfds,
            a_grandchild_holding_the_socket_does_not_delay_join,
            unencodable_result_is_a_decode_error,
            drop_waits_for_non_daemon_and_kills_daemon,
            names_parent_and_active_children,
            fork_server_survives_being_killed_and_serves_threaded_callers,
            fork_needs_the_fork_method,
            buffered_output_is_not_written_twice,
            handles_cross_every_start_method,
            a_late_join_does_not_mistake_a_started_child_for_a_stuck_one,
            a_handle_outside_a_process_argument_is_an_error,
            a_queue_round_trip_with_spawned_children,
            a_channel_whose_only_sender_is_a_spawned_child_disconnects,
            a_channel_sender_killed_mid_stream_disconnects,
            a_child_killed_in_bootstrap_does_not_keep_the_channel_connected,
            spsc_ends_move_to_a_spawned_child,
            a_byte_queue_crosses_spawn,
            a_shared_slice_crosses_spawn,
            a_queue_handle_outside_a_process_argument_is_an_error,
            an_spsc_end_encoded_twice_in_one_argument_is_refused,
            a_spawned_child_hands_its_sender_on_to_a_grandchild,
            spawning_with_handles_out_of_descriptors_fails_cleanly,
            is_alive_turns_false_for_every_method_without_pidfds,
            a_channel_whose_only_receiver_is_a_spawned_child_disconnects_the_sender,
            a_result_whose_serialize_panics_is_reported_not_hung,
            a_stopped_fork_server_is_replaced_within_the_bootstrap_timeout,
            a_child_stopped_or_killed_between_two_imports_holds_then_releases_both_ends,
            signalling_a_reaped_fork_server_child_without_pidfd_spares_its_pids_next_owner,
            no_zombies_and_no_descriptor_growth,
        ],
        &[],
    )
}

const METHODS: [StartMethod; 3] = [
    StartMethod::Fork,
    StartMethod::Spawn,
    StartMethod::ForkServer,
];

fn with<F, A, R>(method: StartMethod, f: F, arg: A) -> Child<R>
where
    F: Fn(A) -> R + Copy + 'static,
    A: Serialize + serde::de::DeserializeOwned,
    R: Serialize + serde::de::DeserializeOwned,
{
    Process::builder()
        .start_method(method)
        .spawn(f, arg)
        .unwrap_or_else(|e| panic!("starting a {method:?} child: {e}"))
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Record {
    id: u32,
    label: String,
    scores: Vec<f64>,
    parent: Option<Box<Record>>,
    tags: BTreeMap<String, i64>,
}

fn square(x: u64) -> u64 {
    x * x
}

fn make_record(id: u32) -> Record {
    Record {
        id,
        label: format!("record {id}"),
        scores: vec![0.5, 1.5, f64::MAX],
        parent: Some(Box::new(Record {
            id: id + 1,
            label: "parent".into(),
            scores: vec![],
            parent: None,
            tags: BTreeMap::new(),
        })),
        tags: [("a".to_string(), -1), ("b".to_string(), i64::MIN)].into(),
    }
}

fn returns_values_of_several_types() {
    for m in METHODS {
        assert_eq!(with(m, square, 12).join(), Ok(144), "{m:?}");
        assert_eq!(
            with(m, |s: String| s.to_uppercase(), "héllo".to_string()).join(),
            Ok("HÉLLO".to_string()),
            "{m:?}"
        );
        assert_eq!(
            with(m, |n: i32| (0..n).collect::<Vec<i32>>(), 5).join(),
            Ok(vec![0, 1, 2, 3, 4])
        );
        assert_eq!(with(m, make_record, 7).join(), Ok(make_record(7)));
        assert_eq!(with(m, |()| (), ()).join(), Ok(()));
        assert_eq!(
            with(m, |(a, b): (u8, char)| (b, a, None::<u8>), (1, 'x')).join(),
            Ok(('x', 1, None))
        );
        let r: Result<u32, String> =
            with(m, |x: u32| x.checked_sub(1).ok_or("zero".to_string()), 0)
                .join()
                .unwrap();
        assert_eq!(r, Err("zero".to_string()));
    }
    // fork: a capturing closure.
    let captured = make_record(3);
    let c = Process::fork(move || captured.scores.len() + captured.id as usize).unwrap();
    assert_eq!(c.join(), Ok(6));
}

fn panic_message_and_location_come_back() {
    for m in METHODS {
        let err = with(m, |n: u32| -> u32 { panic!("boom {n}") }, 7)
            .join()
            .unwrap_err();
        match &err {
            ProcessError::Panicked { message, location } => {
                assert_eq!(message, "boom 7");
                let loc = location.as_deref().expect("location");
                assert!(loc.starts_with("tests/process.rs:"), "{loc}");
            }
            other => panic!("{m:?}: expected Panicked, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("panicked") && text.contains("boom 7"),
            "{text}"
        );
    }
    let err = Process::fork(|| -> u8 { std::panic::panic_any(42u8) })
        .unwrap()
        .join()
        .unwrap_err();
    assert!(
        matches!(&err, ProcessError::Panicked { message, .. } if message == "Box<dyn Any>"),
        "{err:?}"
    );
}

fn exit_codes_come_back() {
    for m in METHODS {
        let err = with(m, |c: i32| -> u32 { std::process::exit(c) }, 3)
            .join()
            .unwrap_err();
        assert_eq!(err, ProcessError::Exited(3), "{m:?}");
        assert!(err.to_string().contains("code 3"));
        let mut c = with(m, |c: i32| -> u32 { std::process::exit(c) }, 0);
        assert_eq!(
            c.join_timeout(Duration::from_secs(10)),
            Err(ProcessError::Exited(0))
        );
    }
}

fn raise(sig: i32) -> u32 {
    if sig == libc::SIGSEGV {
        // No core file for a deliberate crash.
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) };
        // SAFETY: deliberately not: a write through a null pointer, to crash the child.
        unsafe { std::ptr::null_mut::<u32>().write_volatile(1) };
    }
    // SAFETY: raise takes a plain integer.
    unsafe { libc::raise(sig) };
    std::thread::sleep(Duration::from_secs(30));
    0
}

fn signals_are_reported_as_signals() {
    for m in METHODS {
        for sig in [libc::SIGKILL, libc::SIGTERM, libc::SIGSEGV] {
            let err = with(m, raise, sig).join().unwrap_err();
            assert_eq!(err, ProcessError::Signaled(sig), "{m:?}");
        }
    }
    let text = ProcessError::Signaled(libc::SIGSEGV).to_string();
    assert!(
        text.contains("SIGSEGV") && text.contains("crashed"),
        "{text}"
    );
}

fn sleep_then(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn join_timeout_is_honoured_and_the_child_keeps_running() {
    for m in METHODS {
        let mut c = with(m, sleep_then, 1500);
        let t0 = Instant::now();
        assert_eq!(
            c.join_timeout(Duration::from_millis(100)),
            Err(ProcessError::Timeout)
        );
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(1000),
            "{took:?}"
        );
        assert!(c.is_alive());
        assert_eq!(c.exitcode(), None);
        assert_eq!(c.join_timeout(Duration::from_secs(10)), Ok(1500));
        assert!(!c.is_alive());
        assert_eq!(c.exitcode(), Some(0));
    }
}

fn try_join_and_exitcode_poll_without_blocking() {
    let mut c = with(StartMethod::Fork, sleep_then, 300);
    let t0 = Instant::now();
    assert!(c.try_join().is_none());
    assert!(t0.elapsed() < Duration::from_millis(200));
    common::wait_for("the child to finish", Duration::from_secs(5), || {
        !c.is_alive()
    });
    assert_eq!(c.try_join(), Some(Ok(300)));
}

fn terminate_and_kill() {
    for m in METHODS {
        let mut c = with(m, sleep_then, 60_000);
        // Let a spawned child get past bootstrap, so SIGTERM meets the function.
        std::thread::sleep(Duration::from_millis(100));
        c.terminate().unwrap();
        assert_eq!(
            c.join_timeout(Duration::from_secs(5)),
            Err(ProcessError::Signaled(libc::SIGTERM))
        );
        c.terminate().unwrap(); // already reaped: a no-op, not an error
        let mut c = with(m, sleep_then, 60_000);
        c.kill().unwrap();
        assert_eq!(
            c.join_timeout(Duration::from_secs(5)),
            Err(ProcessError::Signaled(libc::SIGKILL))
        );
        let mut c = with(m, sleep_then, 60_000);
        c.kill().unwrap();
        common::wait_for("the kill", Duration::from_secs(5), || !c.is_alive());
        assert_eq!(c.exitcode(), Some(-libc::SIGKILL));
    }
}

fn sleep_forever(_: ()) -> u32 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn daemon_children_die_with_their_parent() {
    daemons_die_with_their_killed_parent();
}

fn daemon_children_die_with_their_parent_in_a_new_pid_namespace() {
    if !common::ns::is_root() {
        return common::ns::skip("this test", "a pid namespace needs root");
    }
    // As `unshare -pf --mount-proc`: we are pid 1 of a new namespace with its own /proc,
    // the killed parent is pid 2, its daemons are reparented to us.
    let ok = common::ns::in_new_pid_namespace(|| {
        assert_eq!(std::process::id(), 1);
        daemons_die_with_their_killed_parent();
    });
    assert!(ok, "the test failed inside its pid namespace");
}

fn daemons_die_with_their_killed_parent() {
    // Orphans come to us, so we can reap them and see how they died.
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
    let pids: Queue<u32> = Queue::new().unwrap();
    let q = pids.clone();
    let mut middle = Process::fork(move || {
        for m in METHODS {
            let c = Process::builder()
                .daemon(true)
                .start_method(m)
                .spawn(sleep_forever, ())
                .unwrap();
            q.put(&c.pid()).unwrap();
            std::mem::forget(c); // the handle would kill it on drop; we want the parent to die
        }
        sleep_forever(())
    })
    .unwrap();
    let daemons: Vec<u32> = METHODS
        .iter()
        .map(|_| pids.get_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200)); // the spawned daemon reaches init
    middle.kill().unwrap();
    assert_eq!(
        middle.join_timeout(Duration::from_secs(5)),
        Err(ProcessError::Signaled(libc::SIGKILL))
    );
    for pid in daemons {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes a valid int.
            let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if rc == pid as i32 {
                assert!(libc::WIFSIGNALED(status), "daemon {pid} status {status:#x}");
                assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {pid} outlived its parent"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn fork_is_refused_with_threads_and_the_default_picks_spawn() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || rx.recv());
    let err = Process::fork(|| 1u8).unwrap_err();
    assert!(
        matches!(err, Error::MultiThreaded { threads } if threads >= 2),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("StartMethod::Spawn") && text.contains("procshare::init()"),
        "{text}"
    );
    let err = Process::builder()
        .start_method(StartMethod::Fork)
        .spawn(square, 2)
        .unwrap_err();
    assert!(matches!(err, Error::MultiThreaded { .. }), "{err:?}");
    assert_eq!(
        procshare::process::default_start_method().unwrap(),
        StartMethod::Spawn
    );
    let c = Process::spawn(square, 9).unwrap();
    assert_eq!(c.start_method(), StartMethod::Spawn);
    assert_eq!(c.join(), Ok(81));
    // The unchecked variant is the caller's promise; the other thread holds no lock here.
    // SAFETY: the other thread is blocked in a channel receive, holding no allocator,
    // stdio or panic-hook lock.
    let c = unsafe { Process::fork_unchecked(|| 5u8) }.unwrap();
    assert_eq!(c.join(), Ok(5));
    tx.send(()).unwrap();
    t.join().unwrap().unwrap();
}

fn spawn_handshake_mismatch_is_a_bootstrap_error() {
    tamper_next_spawn(Tamper::Executable);
    let err = with(StartMethod::Spawn, square, 3).join().unwrap_err();
    match &err {
        ProcessError::Bootstrap(why) => assert!(why.contains("different executable"), "{why}"),
        other => panic!("expected Bootstrap, got {other:?}"),
    }
    tamper_next_spawn(Tamper::FunctionType);
    let err = with(StartMethod::Spawn, square, 3).join().unwrap_err();
    match &err {
        ProcessError::Bootstrap(why) => {
            assert!(why.contains("different function type"), "{why}")
        }
        other => panic!("expected Bootstrap, got {other:?}"),
    }
    assert!(err.to_string().contains("could not start its function"));
    // The fork server's children check the same handshake.
    tamper_next_spawn(Tamper::Executable);
    let err = with(StartMethod::ForkServer, square, 3).join().unwrap_err();
    assert!(
        matches!(&err, ProcessError::Bootstrap(w) if w.contains("different executable")),
        "{err:?}"
    );
    tamper_next_spawn(Tamper::FunctionType);
    let err = with(StartMethod::ForkServer, square, 3).join().unwrap_err();
    assert!(
        matches!(&err, ProcessError::Bootstrap(w) if w.contains("different function type")),
        "{err:?}"
    );
    // Untampered spawns still work afterwards.
    assert_eq!(with(StartMethod::Spawn, square, 3).join(), Ok(9));
    assert_eq!(with(StartMethod::ForkServer, square, 3).join(), Ok(9));
}

fn spawned_child_dying_before_init_is_an_error_in_time() {
    // SAFETY: the test process is single-threaded.
    unsafe { std::env::set_var(BEFORE_INIT, "exit") };
    let t0 = Instant::now();
    let err = with(StartMethod::Spawn, square, 3).join().unwrap_err();
    assert!(
        matches!(&err, ProcessError::Bootstrap(w) if w.contains("exited with code 3 before procshare::init()")),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Also when joined only after its bootstrap deadline.
    let c = Process::builder()
        .start_method(StartMethod::Spawn)
        .bootstrap_timeout(Duration::from_millis(100))
        .spawn(square, 3)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let err = c.join().unwrap_err();
    assert!(
        matches!(&err, ProcessError::Bootstrap(w) if w.contains("exited with code 3 before procshare::init()")),
        "{err:?}"
    );

    // SAFETY: as above.
    unsafe { std::env::set_var(BEFORE_INIT, "hang") };
    let t0 = Instant::now();
    let c = Process::builder()
        .start_method(StartMethod::Spawn)
        .bootstrap_timeout(Duration::from_millis(300))
        .spawn(square, 3)
        .unwrap();
    let pid = c.pid();
    let err = c.join().unwrap_err();
    let took = t0.elapsed();
    assert!(
        matches!(&err, ProcessError::Bootstrap(w) if w.contains("did not reach procshare::init() within")),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // It was killed and reaped, not left behind.
    // SAFETY: kill with signal 0 only checks existence.
    assert_eq!(unsafe { libc::kill(pid as i32, 0) }, -1);

    // join_timeout shorter than the bootstrap timeout is still a plain Timeout.
    let mut c = Process::builder()
        .start_method(StartMethod::Spawn)
        .bootstrap_timeout(Duration::from_millis(500))
        .spawn(square, 3)
        .unwrap();
    assert_eq!(
        c.join_timeout(Duration::from_millis(50)),
        Err(ProcessError::Timeout)
    );
    assert!(matches!(
        c.join_timeout(Duration::from_secs(5)),
        Err(ProcessError::Bootstrap(_))
    ));
    // SAFETY: as above.
    unsafe { std::env::remove_var(BEFORE_INIT) };
}

static COUNTER: OnceLock<Value<u64>> = OnceLock::new();

fn bump(times: u32) -> u64 {
    let v = COUNTER.get().expect("inherited from the parent under Fork");
    for _ in 0..times {
        *v.lock().unwrap() += 1;
    }
    v.get()
}

fn value_and_queue_work_in_fork_children() {
    let value = COUNTER.get_or_init(|| Value::new(0u64).unwrap());
    let q: Queue<String> = Queue::new().unwrap();
    let children: Vec<Child<u64>> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                with(StartMethod::Fork, bump, 1000)
            } else {
                let q = q.clone();
                Process::fork(move || {
                    q.put(&format!("from {}", current_process().pid())).unwrap();
                    bump(1000)
                })
                .unwrap()
            }
        })
        .collect();
    for c in children {
        assert!(c.join().unwrap() <= 4000);
    }
    assert_eq!(value.get(), 4000);
    for _ in 0..2 {
        let m = q.get_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.starts_with("from "), "{m}");
    }
}

fn large_results_do_not_deadlock() {
    for m in METHODS {
        let v = with(m, |n: usize| vec![0xabu8; n], 8 << 20).join().unwrap();
        assert_eq!(v.len(), 8 << 20);
        assert!(v.iter().all(|&b| b == 0xab));
        // A large argument, too (Spawn carries it in a memfd).
        let n = with(m, |v: Vec<u8>| v.len(), vec![1u8; 4 << 20]).join();
        assert_eq!(n, Ok(4 << 20));
    }
}

fn die_while_sending(n: usize) -> Vec<u8> {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(30));
        // SAFETY: raise takes a plain integer.
        unsafe { libc::raise(libc::SIGKILL) };
    });
    vec![7u8; n]
}

fn a_child_killed_mid_write_is_reported_as_a_signal() {
    for m in METHODS {
        // Encoding and sending 256 MiB takes far longer than 30 ms: the kill lands while
        // the value is being encoded or written, never after it arrived whole.
        let t0 = Instant::now();
        let r = with(m, die_while_sending, 256 << 20)
            .join()
            .map(|v| v.len());
        assert_eq!(r, Err(ProcessError::Signaled(libc::SIGKILL)), "{m:?}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    // Deterministically mid-write: the parent stops reading while the child writes 16 MiB
    // into a socket that holds a few hundred KiB, then kills it.
    let flag = FLAG.get_or_init(|| Value::new(0u32).unwrap());
    flag.set(0);
    let mut c = Process::fork(|| {
        FLAG.get().unwrap().set(1);
        vec![9u8; 16 << 20]
    })
    .unwrap();
    common::wait_for("the child to start", Duration::from_secs(5), || {
        flag.get() == 1
    });
    // Nobody reads yet: once encoded, the child blocks in send with most of it unsent.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.is_alive());
    c.kill().unwrap();
    let r = c.join_timeout(Duration::from_secs(5)).map(|v| v.len());
    assert_eq!(r, Err(ProcessError::Signaled(libc::SIGKILL)));
}

fn everything_works_without_pidfds() {
    disable_pidfds(true);
    for m in METHODS {
        assert_eq!(with(m, square, 5).join(), Ok(25));
        assert_eq!(
            with(m, raise, libc::SIGTERM).join(),
            Err(ProcessError::Signaled(libc::SIGTERM))
        );
        let mut c = with(m, sleep_then, 60_000);
        assert_eq!(
            c.join_timeout(Duration::from_millis(50)),
            Err(ProcessError::Timeout)
        );
        assert!(c.is_alive());
        c.kill().unwrap();
        assert_eq!(c.join(), Err(ProcessError::Signaled(libc::SIGKILL)));
        let c = with(m, sleep_then, 60_000);
        assert_eq!(active_children().len(), 1);
        c.terminate().unwrap();
        assert_eq!(c.join(), Err(ProcessError::Signaled(libc::SIGTERM)));
    }
    disable_pidfds(false);
}

fn a_grandchild_holding_the_socket_does_not_delay_join() {
    let c = Process::fork(|| {
        // SAFETY: the child is single-threaded; the grandchild only sleeps and _exits.
        if unsafe { libc::fork() } == 0 {
            std::thread::sleep(Duration::from_secs(10));
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(0) };
        }
        17u8
    })
    .unwrap();
    let t0 = Instant::now();
    assert_eq!(c.join(), Ok(17));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to be encoded"))
    }
}

impl<'de> Deserialize<'de> for Unencodable {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(Unencodable)
    }
}

fn unencodable_result_is_a_decode_error() {
    for m in METHODS {
        let err = with(m, |()| Unencodable, ())
            .join()
            .err()
            .expect("an error");
        assert!(
            matches!(&err, ProcessError::Decode(w) if w.contains("could not encode")),
            "{err:?}"
        );
    }
}

static FLAG: OnceLock<Value<u32>> = OnceLock::new();

fn set_flag_after(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    FLAG.get().unwrap().set(1);
    1
}

fn drop_waits_for_non_daemon_and_kills_daemon() {
    let flag = FLAG.get_or_init(|| Value::new(0u32).unwrap());
    let c = with(StartMethod::Fork, set_flag_after, 300);
    drop(c);
    assert_eq!(flag.get(), 1, "dropping a non-daemon child waits for it");

    flag.set(0);
    let c = Process::builder()
        .daemon(true)
        .start_method(StartMethod::Fork)
        .spawn(set_flag_after, 2000)
        .unwrap();
    let pid = c.pid();
    let t0 = Instant::now();
    drop(c);
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Reaped: no such child any more.
    let mut status = 0;
    // SAFETY: waitpid writes a valid int.
    let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    assert_eq!(rc, -1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(flag.get(), 0);
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Seen {
    name: String,
    pid: u32,
    parent: Option<(u32, String)>,
}

fn who_am_i(_: ()) -> Seen {
    let me = current_process();
    Seen {
        name: me.name().to_owned(),
        pid: me.pid(),
        parent: parent_process().map(|p| (p.pid(), p.name().to_owned())),
    }
}

fn names_parent_and_active_children() {
    // The runner (a program not started by procshare: `MainProcess`) starts each test
    // with `Process::fork`, naming the test process after the test.
    let me = current_process();
    assert_eq!(me.name(), "names_parent_and_active_children");
    let runner = parent_process().expect("the runner is our procshare parent");
    assert_eq!(runner.name(), "MainProcess");
    for m in METHODS {
        let c = Process::builder()
            .name("worker-1")
            .start_method(m)
            .spawn(who_am_i, ())
            .unwrap();
        assert_eq!(c.name(), "worker-1");
        let pid = c.pid();
        let seen = c.join().unwrap();
        assert_eq!(
            seen,
            Seen {
                name: "worker-1".into(),
                pid,
                parent: Some((me.pid(), me.name().into())),
            }
        );
        let c = with(m, who_am_i, ());
        assert!(c.name().starts_with("Process-"), "{}", c.name());
    }
    let mut c = with(StartMethod::Fork, sleep_then, 60_000);
    let active = active_children();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].pid(), c.pid());
    c.kill().unwrap();
    let _ = c.join_timeout(Duration::from_secs(5));
    assert!(active_children().is_empty());
}

fn fork_server_survives_being_killed_and_serves_threaded_callers() {
    let c = with(StartMethod::ForkServer, square, 4);
    assert_eq!(c.start_method(), StartMethod::ForkServer);
    assert_eq!(c.join(), Ok(16));
    // Kill the server (our only other child) behind the library's back.
    let server = server_pids();
    assert_eq!(server.len(), 1, "one fork server: {server:?}");
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(server[0] as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(50));
    // The next request finds it gone, reaps it, and starts another.
    assert_eq!(with(StartMethod::ForkServer, square, 5).join(), Ok(25));
    let again = server_pids();
    assert_eq!(again.len(), 1);
    assert_ne!(again, server);
    // A child whose server dies while it runs is still reported when it ends.
    let mut c = with(StartMethod::ForkServer, sleep_then, 300);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(again[0] as i32, libc::SIGKILL) }, 0);
    let r = c.join_timeout(Duration::from_secs(5));
    assert!(
        matches!(r, Ok(300) | Err(ProcessError::Exited(-1))),
        "{r:?}"
    );
    // ... also with a forked sibling holding copies of the parent's descriptors (the
    // status socket's end of file comes from the server's end, which nobody else holds).
    let mut c = with(StartMethod::ForkServer, sleep_then, 200);
    let sibling = Process::fork(|| std::thread::sleep(Duration::from_secs(4))).unwrap();
    let server = server_pids();
    assert_eq!(server.len(), 1, "{server:?}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(server[0] as i32, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let r = c.join_timeout(Duration::from_secs(5));
    assert!(
        matches!(r, Ok(200) | Err(ProcessError::Exited(-1))),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    sibling.kill().unwrap();
    assert!(sibling.join().is_err());
    // With other threads running, the default is the (running) fork server.
    assert_eq!(with(StartMethod::ForkServer, square, 1).join(), Ok(1));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || rx.recv());
    assert_eq!(
        procshare::process::default_start_method().unwrap(),
        StartMethod::ForkServer
    );
    let c = Process::spawn(square, 6).unwrap();
    assert_eq!(c.start_method(), StartMethod::ForkServer);
    assert_eq!(c.join(), Ok(36));
    tx.send(()).unwrap();
    t.join().unwrap().unwrap();
}

/// Our children that are not procshare children (the fork server), from /proc.
fn server_pids() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut f = after.split(' ');
        let state = f.next().unwrap();
        let ppid: u32 = f.next().unwrap().parse().unwrap();
        if ppid == me && state != "Z" && !active_children().iter().any(|c| c.pid() == pid) {
            out.push(pid);
        }
    }
    out
}

fn fork_needs_the_fork_method() {
    let err = Process::builder()
        .start_method(StartMethod::Spawn)
        .fork(|| 1u8)
        .unwrap_err();
    assert!(err.to_string().contains("only StartMethod::Fork"), "{err}");
}

fn buffered_output_is_not_written_twice() {
    // stdout to a pipe we read: print a partial line (buffered by Rust's LineWriter),
    // then fork; the child's flush on exit must not print it again.
    let (r, w) = {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into a valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    };
    let writer = Process::fork(move || {
        // SAFETY: plain descriptor calls on descriptors this process owns.
        unsafe {
            libc::dup2(w, 1);
            libc::close(w);
            libc::close(r);
        }
        print!("partial ");
        let c = Process::fork(|| print!("child")).unwrap();
        c.join().unwrap();
        use std::io::Write;
        std::io::stdout().flush().unwrap();
    })
    .unwrap();
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(w) };
    writer.join().unwrap();
    let mut out = String::new();
    use std::io::Read;
    // SAFETY: `r` is an open descriptor we own; File takes it over.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(r) };
    file.read_to_string(&mut out).unwrap();
    assert_eq!(out, "partial child");
}

fn a_late_join_does_not_mistake_a_started_child_for_a_stuck_one() {
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        let mut c = Process::builder()
            .start_method(m)
            .bootstrap_timeout(Duration::from_millis(200))
            .spawn(sleep_then, 600)
            .unwrap();
        // Nobody reads the child's STARTED report until well after its deadline.
        std::thread::sleep(Duration::from_millis(400));
        assert!(c.is_alive());
        assert_eq!(c.join_timeout(Duration::from_secs(5)), Ok(600), "{m:?}");
    }
}

fn add_under_lock((v, n): (Value<u64>, u64)) -> u64 {
    for _ in 0..n {
        *v.lock().unwrap() += 1;
    }
    v.get()
}

type Handles = (Array<u32>, Shared<AtomicU64>, Connection, Segment);

fn use_handles((arr, hits, conn, seg): Handles) -> (u32, usize) {
    arr.lock().unwrap()[2] = 7;
    hits.fetch_add(5, Ordering::SeqCst);
    conn.send("hello from the child").unwrap();
    let n: u32 = conn.recv().unwrap();
    (n + 1, seg.len())
}

fn handles_cross_every_start_method() {
    for m in METHODS {
        let v = Value::new(0u64).unwrap();
        let kids: Vec<Child<u64>> = (0..3)
            .map(|_| with(m, add_under_lock, (v.clone(), 1000)))
            .collect();
        for k in kids {
            assert!(k.join().unwrap() <= 3000);
        }
        assert_eq!(v.get(), 3000, "{m:?}");

        let arr = Array::<u32>::zeroed(4).unwrap();
        let hits = Shared::new(AtomicU64::new(0)).unwrap();
        let seg = Segment::anonymous(12345).unwrap();
        let (ours, theirs) = procshare::pipe().unwrap();
        let c = with(m, use_handles, (arr.clone(), hits.clone(), theirs, seg));
        let hello: String = ours.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(hello, "hello from the child");
        ours.send(&41u32).unwrap();
        assert_eq!(c.join(), Ok((42, 12345)), "{m:?}");
        assert_eq!(arr.to_vec(), vec![0, 0, 7, 0]);
        assert_eq!(hits.load(Ordering::SeqCst), 5);
        // The child's end is closed everywhere now: end of file, not a hang.
        assert!(ours.recv_timeout::<u32>(Duration::from_secs(5)).is_err());
    }
}

fn a_handle_outside_a_process_argument_is_an_error() {
    let v = Value::new(1u32).unwrap();
    let q: Queue<Value<u32>> = Queue::new().unwrap();
    assert!(q.put(&v).is_err(), "a Value cannot travel over a Queue");
    // ... and `Process::fork` moves it without encoding: it just works there.
    let c = Process::fork(move || v.get() + 1).unwrap();
    assert_eq!(c.join(), Ok(2));
}

/// Answers every message of `inbox` until "stop", through `outbox`; returns how many.
fn echo((inbox, outbox): (Queue<String>, QueueSender<(u32, String)>)) -> u32 {
    let mut n = 0;
    loop {
        let msg = inbox.get_timeout(Duration::from_secs(10)).unwrap();
        if msg == "stop" {
            return n;
        }
        n += 1;
        outbox.put(&(n, msg.to_uppercase())).unwrap();
    }
}

/// Counts the messages until every sender is gone.
fn count_until_disconnected(rx: QueueReceiver<String>) -> usize {
    let mut n = 0;
    loop {
        match rx.get_timeout(Duration::from_secs(10)) {
            Ok(_) => n += 1,
            Err(QueueError::Disconnected) => return n,
            Err(e) => panic!("after {n} messages: {e:?}"),
        }
    }
}

fn a_queue_round_trip_with_spawned_children() {
    for m in METHODS {
        let inbox: Queue<String> = Queue::new().unwrap();
        let (tx, rx) = Queue::<(u32, String)>::new().unwrap().split().unwrap();
        let c = with(m, echo, (inbox.clone(), tx));
        for word in ["alpha", "beta", "gamma"] {
            inbox.put(&word.to_string()).unwrap();
        }
        inbox.put(&"stop".to_string()).unwrap();
        let got: Vec<(u32, String)> = (0..3)
            .map(|_| rx.get_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(
            got,
            [(1, "ALPHA".into()), (2, "BETA".into()), (3, "GAMMA".into())],
            "{m:?}"
        );
        assert_eq!(c.join(), Ok(3), "{m:?}");
        // The child's sender was the only one: gone with it.
        assert_eq!(
            rx.get_timeout(Duration::from_secs(10)),
            Err(QueueError::Disconnected),
            "{m:?}"
        );
        if m == StartMethod::Fork {
            // A forked child also inherits the parent's `tx` below (it never drops it),
            // so it would wait for itself: only a spawned child starts with just its
            // argument.
            continue;
        }
        // A receive-only handle in the child learns that the parent's sender went.
        let (tx, rx) = Queue::<String>::new().unwrap().split().unwrap();
        let c = with(m, count_until_disconnected, rx);
        for i in 0..5 {
            tx.put(&format!("message {i}")).unwrap();
        }
        drop(tx);
        assert_eq!(c.join(), Ok(5), "{m:?}");
    }
}

fn send_numbers((tx, n): (procshare::channel::Sender<u64>, u64)) -> u64 {
    for i in 0..n {
        tx.send(i).unwrap();
    }
    n
}

/// Receives until the channel says `Disconnected`; every wait bounded.
fn drain(rx: &procshare::channel::Receiver<u64>) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(v) => got.push(v),
            Err(RecvTimeoutError::Disconnected) => return got,
            Err(e) => panic!("after {} values: {e:?}", got.len()),
        }
    }
}

fn a_channel_whose_only_sender_is_a_spawned_child_disconnects() {
    for m in METHODS {
        for _ in 0..3 {
            // A small ring: the child blocks on it, so the stream outlives the spawn.
            let (tx, rx) = procshare::channel::<u64>(4).unwrap();
            let c = with(m, send_numbers, (tx, 100));
            // `tx` went into the argument, which `spawn` dropped as it returned: this
            // process holds no sender, and the child may not have registered its own yet.
            assert_eq!(drain(&rx), (0..100).collect::<Vec<_>>(), "{m:?}");
            assert_eq!(c.join(), Ok(100), "{m:?}");
        }
    }
}

fn send_forever(tx: procshare::channel::Sender<u64>) -> u64 {
    for i in 0.. {
        tx.send(i).unwrap();
    }
    unreachable!()
}

fn a_channel_sender_killed_mid_stream_disconnects() {
    for m in METHODS {
        let (tx, rx) = procshare::channel::<u64>(4).unwrap();
        let c = with(m, send_forever, tx);
        for i in 0..20 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(i), "{m:?}");
        }
        c.kill().unwrap();
        assert!(matches!(c.join(), Err(ProcessError::Signaled(_))));
        let rest = drain(&rx);
        assert!(rest.len() <= 5, "{m:?}: {rest:?}");
    }
}

fn a_child_killed_in_bootstrap_does_not_keep_the_channel_connected() {
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        // The child fails its handshake before it decodes (imports) its argument.
        tamper_next_spawn(Tamper::FunctionType);
        let (tx, rx) = procshare::channel::<u64>(4).unwrap();
        let c = with(m, send_numbers, (tx, 10));
        assert!(matches!(c.join(), Err(ProcessError::Bootstrap(_))), "{m:?}");
        assert_eq!(drain(&rx), Vec::<u64>::new(), "{m:?}");
        // SIGKILLed as soon as it exists: before, during or after the import.
        for _ in 0..3 {
            let (tx, rx) = procshare::channel::<u64>(4).unwrap();
            let c = with(m, send_forever, tx);
            c.kill().unwrap();
            let _ = c.join();
            let got = drain(&rx);
            assert!(got.len() <= 4, "{m:?}: {got:?}");
        }
        // Never started at all (a child killed before it ran `init`): the same.
        let (tx, rx) = procshare::channel::<u64>(4).unwrap();
        let c = with(m, sleep_then_send, (tx, 60_000));
        c.kill().unwrap();
        let _ = c.join();
        assert_eq!(drain(&rx), Vec::<u64>::new(), "{m:?}");
    }
}

fn sleep_then_send((tx, ms): (procshare::channel::Sender<u64>, u64)) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    tx.send(1).unwrap();
    1
}

/// Doubles what arrives on `rx` into `tx` until `rx` is disconnected.
fn double((rx, tx): (procshare::spsc::Receiver<u64>, procshare::spsc::Sender<u64>)) -> u64 {
    let mut n = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(v) => tx.send(v * 2).unwrap(),
            Err(RecvTimeoutError::Disconnected) => return n,
            Err(e) => panic!("after {n} values: {e:?}"),
        }
        n += 1;
    }
}

fn spsc_ends_move_to_a_spawned_child() {
    // (Not Fork: a forked child would inherit `to_child` too, and wait for itself.)
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        let (to_child, from_parent) = procshare::spsc::<u64>(8).unwrap();
        let (to_parent, from_child) = procshare::spsc::<u64>(8).unwrap();
        // The parent used both ends it hands over: ownership must move with them.
        to_parent.send(1000).unwrap();
        assert_eq!(from_parent.try_recv(), Err(procshare::TryRecvError::Empty));
        let c = with(m, double, (from_parent, to_parent));
        assert_eq!(from_child.recv_timeout(Duration::from_secs(10)), Ok(1000));
        for i in 0..50 {
            to_child.send(i).unwrap();
            assert_eq!(from_child.recv_timeout(Duration::from_secs(10)), Ok(2 * i));
        }
        drop(to_child); // the child's receiver sees Disconnected and the child returns
        assert_eq!(c.join(), Ok(50), "{m:?}");
        assert_eq!(
            from_child.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected),
            "{m:?}"
        );
    }
}

fn reverse_bytes((inbox, outbox): (ByteQueue, ByteQueue)) -> usize {
    let msg = inbox.recv().unwrap();
    outbox
        .send(&msg.iter().rev().copied().collect::<Vec<u8>>())
        .unwrap();
    msg.len()
}

fn a_byte_queue_crosses_spawn() {
    for m in METHODS {
        let inbox = ByteQueue::builder()
            .capacity(1 << 16)
            .max_message(1 << 20)
            .bytes()
            .unwrap();
        let outbox = ByteQueue::new().unwrap();
        let c = with(m, reverse_bytes, (inbox.clone(), outbox.clone()));
        // Larger than the ring: chunked, and the child must know the message limit.
        let msg: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        inbox.send(&msg).unwrap();
        let back = outbox.recv().unwrap();
        assert_eq!(back, msg.iter().rev().copied().collect::<Vec<u8>>());
        assert_eq!(c.join(), Ok(200_000), "{m:?}");
    }
}

fn sum_slice(table: Shared<[u64]>) -> u64 {
    table.iter().sum()
}

fn mark_slice(table: Shared<[AtomicU64]>) -> usize {
    table[1].store(99, Ordering::SeqCst);
    table.len()
}

fn a_shared_slice_crosses_spawn() {
    for m in METHODS {
        let values = Shared::from_slice(&[1u64, 2, 3, 4]).unwrap();
        assert_eq!(with(m, sum_slice, values.clone()).join(), Ok(10), "{m:?}");
        let flags: Shared<[AtomicU64]> = Shared::zeroed(3).unwrap();
        assert_eq!(with(m, mark_slice, flags.clone()).join(), Ok(3), "{m:?}");
        assert_eq!(flags[1].load(Ordering::SeqCst), 99, "{m:?}");
    }
}

fn a_queue_handle_outside_a_process_argument_is_an_error() {
    let q: Queue<u32> = Queue::new().unwrap();
    let (tx, rx) = procshare::channel::<u8>(4).unwrap();
    let (stx, srx) = procshare::spsc::<u8>(4).unwrap();
    let b = ByteQueue::new().unwrap();
    assert!(postcard::to_allocvec(&q).is_err());
    assert!(postcard::to_allocvec(&q.sender().unwrap()).is_err());
    assert!(postcard::to_allocvec(&q.receiver().unwrap()).is_err());
    assert!(postcard::to_allocvec(&(&tx, &rx)).is_err());
    assert!(postcard::to_allocvec(&b).is_err());
    assert!(postcard::to_allocvec(&stx).is_err());
    assert!(postcard::to_allocvec(&srx).is_err());
    // A failed encoding hands nothing over: the ends still work here.
    stx.send(3).unwrap();
    assert_eq!(srx.recv(), Ok(3));
    tx.send(4).unwrap();
    assert_eq!(rx.recv(), Ok(4));
    // Nor may a queue travel over a queue.
    let qq: Queue<Queue<u32>> = Queue::new().unwrap();
    assert!(qq.put(&q).is_err());
    // And nothing was lent on the way: the receivers see the last sender go.
    drop(tx);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(RecvTimeoutError::Disconnected)
    );
    let (tx, rx) = q.split().unwrap();
    drop(tx);
    assert_eq!(
        rx.get_timeout(Duration::from_secs(5)),
        Err(QueueError::Disconnected)
    );
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn no_zombies_and_no_descriptor_growth() {
    let run_mix = || {
        for m in METHODS {
            assert_eq!(with(m, square, 2).join(), Ok(4));
            assert!(with(m, |()| -> u8 { panic!("x") }, ()).join().is_err());
            let mut c = with(m, sleep_then, 60_000);
            assert_eq!(
                c.join_timeout(Duration::from_millis(10)),
                Err(ProcessError::Timeout)
            );
            c.kill().unwrap();
            drop(c);
            let c = Process::builder()
                .daemon(true)
                .start_method(m)
                .spawn(sleep_then, 60_000)
                .unwrap();
            drop(c);
            drop(with(m, square, 3)); // dropped unjoined: waited for
            let v = Value::new(0u64).unwrap();
            assert_eq!(with(m, add_under_lock, (v, 1)).join(), Ok(1)); // handle descriptors
            let (tx, rx) = procshare::channel::<u64>(4).unwrap(); // queue descriptors
            assert_eq!(with(m, send_numbers, (tx, 3)).join(), Ok(3));
            assert_eq!(drain(&rx), [0, 1, 2]);
        }
        tamper_next_spawn(Tamper::Executable);
        assert!(with(StartMethod::Spawn, square, 1).join().is_err());
    };
    run_mix(); // warm up lazily opened descriptors, if any
    let before = fd_count();
    for _ in 0..3 {
        run_mix();
    }
    assert_eq!(fd_count(), before, "descriptors leaked");
    // No child of ours is left but the fork server: no zombie, nothing running.
    assert!(active_children().is_empty(), "{:?}", active_children());
    assert_eq!(server_pids().len(), 1);
    // SAFETY: an all-zero siginfo_t is valid; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid and writable.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: reading si_pid of a waitid result (zero: no child has exited unreaped).
    assert!(rc == 0 && unsafe { info.si_pid() } == 0, "a zombie is left");
}

/// An argument that encodes its one spsc sender twice (as serde's `rc` feature does with
/// an `Rc` shared twice): decoded, it would give the child two producers of one end.
struct SenderTwice(
    procshare::spsc::Sender<u64>,
    Option<procshare::spsc::Sender<u64>>,
);

impl Serialize for SenderTwice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.0, &self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SenderTwice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (a, b) =
            <(procshare::spsc::Sender<u64>, procshare::spsc::Sender<u64>)>::deserialize(d)?;
        Ok(SenderTwice(a, Some(b)))
    }
}

fn send_through_both(two: SenderTwice) -> u64 {
    two.0.send(1).unwrap();
    if let Some(b) = &two.1 {
        b.send(2).unwrap();
    }
    2
}

fn an_spsc_end_encoded_twice_in_one_argument_is_refused() {
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        let (tx, rx) = procshare::spsc::<u64>(8).unwrap();
        let r = Process::builder()
            .start_method(m)
            .spawn(send_through_both, SenderTwice(tx, None));
        match r {
            Err(e) => {
                let why = e.to_string();
                assert!(
                    why.contains("spsc::Sender<T>") && why.contains("twice"),
                    "{m:?}: {why}"
                );
            }
            Ok(c) => {
                let joined = c.join();
                let got: Vec<u64> = rx.try_iter().collect();
                panic!(
                    "{m:?}: the child got two producers of one spsc end: {joined:?}, \
                     received {got:?}"
                );
            }
        }
        // The spawn failed after the first encoding handed the end over, so that handle
        // is gone; nothing counts it any more, and a new sender can be made.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Disconnected),
            "{m:?}"
        );
    }
}

fn method_code(m: StartMethod) -> u8 {
    match m {
        StartMethod::Fork => 0,
        StartMethod::Spawn => 1,
        _ => 2,
    }
}

fn method_of(code: u8) -> StartMethod {
    [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::ForkServer,
    ][code as usize]
}

/// Sends 0, then hands `tx` on to a grandchild (started with `method`) that sends 1..n.
fn relay((tx, n, method): (procshare::channel::Sender<u64>, u64, u8)) -> u64 {
    tx.send(0).unwrap();
    let g = Process::builder()
        .start_method(method_of(method))
        .spawn(
            |(tx, n): (procshare::channel::Sender<u64>, u64)| {
                for i in 1..n {
                    tx.send(i).unwrap();
                }
                n
            },
            (tx, n),
        )
        .unwrap_or_else(|e| panic!("the child could not spawn its grandchild: {e}"));
    g.join().unwrap()
}

fn a_spawned_child_hands_its_sender_on_to_a_grandchild() {
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        for g in METHODS {
            let (tx, rx) = procshare::channel::<u64>(4).unwrap();
            let c = with(m, relay, (tx, 50, method_code(g)));
            assert_eq!(drain(&rx), (0..50).collect::<Vec<_>>(), "{m:?} then {g:?}");
            assert_eq!(c.join(), Ok(50), "{m:?} then {g:?}");
        }
    }
}

fn set_nofile(soft: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        let old = r.rlim_cur;
        r.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        old
    }
}

fn add_and_send((v, a, tx): (Value<u64>, Array<u64>, procshare::channel::Sender<u64>)) -> u64 {
    *v.lock().unwrap() += 1;
    tx.send(a.len() as u64).unwrap();
    1
}

fn spawning_with_handles_out_of_descriptors_fails_cleanly() {
    for m in METHODS {
        // Warm up (the fork server, lazily opened files), then take the baseline.
        let (tx, rx) = procshare::channel::<u64>(4).unwrap();
        let v = Value::new(0u64).unwrap();
        let a = Array::from_slice(&[1u64, 2, 3]).unwrap();
        assert_eq!(
            with(m, add_and_send, (v.clone(), a.clone(), tx.clone())).join(),
            Ok(1)
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(3));
        let base = fd_count();
        let mut ok = 0;
        let mut failed = 0;
        for extra in 0..24u64 {
            let old = set_nofile(base as u64 + extra);
            let r = Process::builder()
                .start_method(m)
                .spawn(add_and_send, (v.clone(), a.clone(), tx.clone()));
            set_nofile(old);
            match r {
                Ok(c) => {
                    ok += 1;
                    assert_eq!(c.join(), Ok(1), "{m:?} with {extra} spare descriptors");
                    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(3));
                }
                Err(e) => {
                    failed += 1;
                    let why = e.to_string();
                    eprintln!("{m:?}, {extra} spare: {why}");
                    assert!(
                        why.contains("escriptor") || why.contains("files"),
                        "{m:?}: {why}"
                    );
                }
            }
            assert_eq!(
                fd_count(),
                base,
                "{m:?}: descriptors leaked with {extra} spare"
            );
        }
        // (A Fork child carries no descriptor: nothing there runs out.)
        assert!(ok > 0, "{m:?}: ok {ok}, failed {failed}");
        assert!(
            failed > 0 || m == StartMethod::Fork,
            "{m:?}: nothing failed"
        );
        assert_eq!(v.get(), 1 + ok);
        // Every failed spawn cancelled its loan: the last sender's drop disconnects.
        drop(tx);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Disconnected),
            "{m:?}: a failed spawn left the channel connected"
        );
    }
}

fn signalling_a_reaped_fork_server_child_without_pidfd_spares_its_pids_next_owner() {
    if !common::ns::is_root() {
        return common::ns::skip("this test", "writing ns_last_pid needs root");
    }
    // In a pid namespace of our own, where we may choose the next pid.
    let ok = common::ns::in_new_pid_namespace(|| {
        for signal in [libc::SIGKILL, libc::SIGTERM, libc::SIGUSR1] {
            // A fork-server child without a pidfd (a kernel that refuses them, or a pidfd
            // lost to the descriptor limit): its pid is not ours to hold.
            disable_pidfds(true);
            let c = with(StartMethod::ForkServer, square, 3);
            disable_pidfds(false);
            let pid = c.pid();
            // It ends and the fork server reaps it; we have not looked yet.
            common::wait_for(
                "the server to reap the child",
                Duration::from_secs(10),
                || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            );
            // Its pid goes to an innocent process.
            std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).unwrap();
            let innocent = Process::builder()
                .daemon(true)
                .fork(|| std::thread::sleep(Duration::from_secs(30)))
                .unwrap();
            assert_eq!(innocent.pid(), pid, "the pid was not recycled as asked");
            c.signal(signal).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                innocent.is_alive(),
                "signal {signal} for the reaped fork-server child reached the process that \
                 got its pid"
            );
            assert_eq!(c.join(), Ok(9));
            innocent.kill().unwrap();
            let _ = innocent.join();
        }
    });
    assert!(ok, "the test failed inside its pid namespace");
}

/// Raises `self.0` in the process that decodes it (the child), between the handles around
/// it in an argument: a child stopped or killed in the middle of importing them.
#[derive(Serialize)]
struct RaiseWhenDecoded(i32);

impl<'de> Deserialize<'de> for RaiseWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sig = i32::deserialize(d)?;
        // SAFETY: raise takes a plain integer.
        unsafe { libc::raise(sig) };
        Ok(RaiseWhenDecoded(sig))
    }
}

type TwoSenders = (
    procshare::channel::Sender<u64>,
    RaiseWhenDecoded,
    procshare::channel::Sender<u64>,
);

fn send_on_both((a, _, b): TwoSenders) -> u64 {
    a.send(1).unwrap();
    b.send(2).unwrap();
    2
}

fn a_child_stopped_or_killed_between_two_imports_holds_then_releases_both_ends() {
    use RecvTimeoutError::{Disconnected, Timeout};
    for m in [StartMethod::Spawn, StartMethod::ForkServer] {
        for sig in [libc::SIGKILL, libc::SIGSTOP] {
            let (ta, ra) = procshare::channel::<u64>(4).unwrap();
            let (tb, rb) = procshare::channel::<u64>(4).unwrap();
            let mut c = with(m, send_on_both, (ta, RaiseWhenDecoded(sig), tb));
            if sig == libc::SIGSTOP {
                // Stopped with `a` imported and `b` not: both ends still count it.
                std::thread::sleep(Duration::from_millis(200));
                assert_eq!(
                    ra.recv_timeout(Duration::from_millis(100)),
                    Err(Timeout),
                    "{m:?}"
                );
                assert_eq!(
                    rb.recv_timeout(Duration::from_millis(100)),
                    Err(Timeout),
                    "{m:?}"
                );
                c.kill().unwrap();
            }
            assert!(
                matches!(
                    c.join_timeout(Duration::from_secs(10)),
                    Err(ProcessError::Signaled(_))
                ),
                "{m:?}"
            );
            assert_eq!(
                ra.recv_timeout(Duration::from_secs(5)),
                Err(Disconnected),
                "{m:?} a"
            );
            assert_eq!(
                rb.recv_timeout(Duration::from_secs(5)),
                Err(Disconnected),
                "{m:?} b"
            );
        }
    }
}

fn a_stopped_fork_server_is_replaced_within_the_bootstrap_timeout() {
    assert_eq!(with(StartMethod::ForkServer, square, 2).join(), Ok(4));
    let server = server_pids();
    assert_eq!(server.len(), 1, "{server:?}");
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(server[0] as i32, libc::SIGSTOP) }, 0);
    let (tx, rx) = procshare::channel::<u64>(4).unwrap();
    let t0 = Instant::now();
    let c = Process::builder()
        .start_method(StartMethod::ForkServer)
        .bootstrap_timeout(Duration::from_millis(500))
        .spawn(send_numbers, (tx, 10))
        .expect("a stopped fork server is replaced");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(drain(&rx), (0..10).collect::<Vec<_>>());
    assert_eq!(c.join(), Ok(10));
    // The stopped server was killed and reaped, and a new one serves.
    common::wait_for("the stopped server to go", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{}", server[0])).exists()
    });
    let now = server_pids();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, server);
}

/// A result whose `Serialize` panics in the child, after writing part of itself.
#[derive(Deserialize, Debug, PartialEq)]
struct PanicsWhenSent(Vec<u64>);

impl Serialize for PanicsWhenSent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        seq.serialize_element(&self.0[0])?;
        panic!("this result cannot be sent");
    }
}

fn make_unsendable(n: u64) -> PanicsWhenSent {
    PanicsWhenSent((0..n).collect())
}

fn a_result_whose_serialize_panics_is_reported_not_hung() {
    for m in METHODS {
        let mut c = with(m, make_unsendable, 100_000);
        let r = c.join_timeout(Duration::from_secs(10));
        match &r {
            Err(ProcessError::Panicked { message, .. }) => {
                assert!(message.contains("cannot be sent"), "{m:?}: {message}")
            }
            other => panic!("{m:?}: {other:?}"),
        }
        // And the process is reaped: no zombie is left behind.
        assert!(!c.is_alive());
    }
}

fn take_one(rx: procshare::channel::Receiver<u64>) -> u64 {
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

fn a_channel_whose_only_receiver_is_a_spawned_child_disconnects_the_sender() {
    for m in METHODS {
        for kill in [false, true] {
            let (tx, rx) = procshare::channel::<u64>(2).unwrap();
            let c = with(m, take_one, rx);
            let c = if kill {
                c.kill().unwrap();
                assert!(c.join().is_err());
                None
            } else {
                Some(c)
            };
            // The only receiver went into the argument: once its child has gone, a
            // blocking send on the full ring must say Disconnected, never wait forever.
            let t = Instant::now();
            let mut sent = 0;
            let end = loop {
                match tx.send(sent) {
                    Ok(()) => sent += 1,
                    Err(e) => break e,
                }
                assert!(sent < 100, "{m:?}: sends never fail");
            };
            assert!(
                matches!(end, procshare::SendError::Disconnected(_)),
                "{m:?}, killed {kill}"
            );
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
            if let Some(c) = c {
                assert_eq!(c.join(), Ok(0), "{m:?}");
            }
        }
    }
}

fn is_alive_turns_false_for_every_method_without_pidfds() {
    for m in METHODS {
        disable_pidfds(true);
        let mut c = with(m, sleep_then, 50);
        disable_pidfds(false);
        // Only `is_alive` is asked (as in `while child.is_alive() { .. }`).
        common::wait_for(
            &format!("{m:?}: is_alive to turn false"),
            Duration::from_secs(5),
            || !c.is_alive(),
        );
        assert_eq!(c.exitcode(), Some(0), "{m:?}");
        assert_eq!(c.join(), Ok(50), "{m:?}");
    }
}
