//! The Pool with real worker processes: every API, chunk sizes, panics, killed workers,
//! timeouts, initializers, recycling, terminate and drop.
//!
//! Every test runs in its own forked process under a watchdog (see `common`), and every
//! wait on the pool below is bounded by that watchdog and by the pool's own death checks.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use procshare::pool::IMap;
use procshare::{
    Array, Pool, PoolBuilder, PoolError, Shared, StartMethod, TaskError, as_completed,
};
use serde::{Deserialize, Serialize};

// --- start methods: the core tests run once per method ---

const FORK: u8 = 0;
const SPAWN: u8 = 1;
const FORKSERVER: u8 = 2;

fn method<const M: u8>() -> StartMethod {
    match M {
        FORK => StartMethod::Fork,
        SPAWN => StartMethod::Spawn,
        _ => StartMethod::ForkServer,
    }
}

/// A builder for a pool whose workers start by method `M`.
fn builder<const M: u8>() -> PoolBuilder {
    Pool::builder().start_method(method::<M>())
}

fn pool<const M: u8>(processes: usize) -> Result<Pool, PoolError> {
    builder::<M>().processes(processes).build()
}

fn own(t: &common::Test) -> common::Test {
    common::Test {
        name: t.name,
        limit: t.limit,
        body: t.body,
    }
}

fn test(name: &'static str, body: fn()) -> common::Test {
    common::Test {
        name,
        limit: Duration::from_secs(30),
        body,
    }
}

/// Each test `name::<M>` once per start method, as `name::fork`, `name::spawn` and
/// `name::forkserver` (a filter on `name` selects all three).
macro_rules! under_every_method {
    ($($name:ident),* $(,)?) => {
        [$(
            test(concat!(stringify!($name), "::fork"), $name::<FORK>),
            test(concat!(stringify!($name), "::spawn"), $name::<SPAWN>),
            test(concat!(stringify!($name), "::forkserver"), $name::<FORKSERVER>),
        )*]
    };
}

/// As `under_every_method`, without ForkServer: for tests that count this process's
/// children (the fork server is one).
macro_rules! under_fork_and_spawn {
    ($($name:ident),* $(,)?) => {
        [$(
            test(concat!(stringify!($name), "::fork"), $name::<FORK>),
            test(concat!(stringify!($name), "::spawn"), $name::<SPAWN>),
        )*]
    };
}

/// As `under_every_method`, without Fork: for tests of a worker's bootstrap.
macro_rules! under_spawn_and_forkserver {
    ($($name:ident),* $(,)?) => {
        [$(
            test(concat!(stringify!($name), "::spawn"), $name::<SPAWN>),
            test(concat!(stringify!($name), "::forkserver"), $name::<FORKSERVER>),
        )*]
    };
}

fn main() {
    procshare::init();
    let all: Vec<common::Test> = tests![
        chunk_sizes_one_larger_than_input_and_empty_input,
        chunksize_zero_is_refused,
        submit_and_as_completed,
        retries_rerun_a_task_whose_worker_died,
        task_timeout_fails_the_task_and_replaces_only_its_worker,
        an_unencodable_result_is_that_items_error,
        close_then_join_finishes_queued_work,
        large_arguments_and_results_cross_promptly,
        futures_resolve_under_a_parking_executor_without_busy_polling,
        a_join_of_many_futures_gets_every_result,
        fork_works_right_after_an_await,
        a_child_forked_unchecked_beside_the_waiter_can_fork_again,
        dropping_the_pool_resolves_pending_futures_closed,
        the_waiter_thread_ends_when_no_future_waits,
        chunk_len_edge_cases,
        a_panicking_chunk_fails_alone_and_poisons_the_array,
        processes_zero_is_refused,
        the_default_start_method_follows_the_process_rule,
        a_worker_that_fails_its_bootstrap_stops_the_pool,
        a_panicking_waker_breaks_neither_fork_nor_the_other_futures,
        a_future_polled_then_dropped_leaves_the_pool_usable,
        map_chunks_over_a_zero_length_shared_slice,
        a_forked_child_cannot_use_or_break_its_parents_pool,
        a_result_whose_serialize_panics_fails_that_item_alone,
        a_worker_out_of_descriptors_fails_one_chunk_map_then_recovers,
        killing_the_fork_server_mid_map_neither_hangs_nor_stops_the_pool,
        threads_started_between_tasks_under_the_default_method,
        terminate_is_prompt_while_the_fork_server_is_stopped,
        fifty_forkserver_respawns_leak_no_descriptors,
    ]
    .iter()
    .map(own)
    .chain(under_every_method![
        map_returns_squares_in_order,
        imap_keeps_order_and_imap_unordered_gives_every_item,
        starmap_apply_and_map_async,
        apply_async_get_timeout_ready_and_wait,
        a_panicking_task_fails_alone_with_message_and_location,
        a_worker_killed_mid_map_fails_exactly_its_task_and_is_replaced,
        a_worker_killed_during_apply_async_fails_that_task,
        initializer_runs_once_per_worker_before_tasks,
        a_failing_initializer_is_a_pool_error_not_a_respawn_loop,
        max_tasks_per_child_recycles_workers,
        map_chunks_reads_arrays_and_shared_slices_in_place,
        for_each_chunk_mut_transforms_in_place_element_by_element,
        a_worker_killed_mid_chunk_fails_that_chunk_only,
        workers_die_with_the_pools_process,
        a_future_whose_worker_is_killed_resolves_to_worker_died,
        initializer_arguments_carry_handles,
        max_tasks_one_with_chunk_maps_resends_the_segment,
        terminate_and_drop_with_a_stopped_worker_are_prompt,
        sigint_to_the_process_group_leaves_no_orphans,
        a_map_of_100k_items_leaks_no_descriptors,
        task_timeout_under_every_method,
        workers_unmap_arrays_the_pool_no_longer_has,
    ])
    .chain(under_spawn_and_forkserver![
        task_timeout_does_not_count_a_workers_bootstrap,
        a_worker_killed_mid_bootstrap_is_replaced,
        a_forked_child_cannot_use_or_terminate_a_spawned_pool,
        recycled_workers_keep_the_initializers_handles_counted,
        an_initializer_argument_that_panics_when_encoded_stops_the_pool,
        terminate_during_the_workers_bootstrap_is_prompt,
    ])
    .chain(
        // Up to three 10 s bootstrap timeouts.
        under_spawn_and_forkserver![a_worker_stopped_in_its_bootstrap_stops_the_pool_in_time].map(
            |t| common::Test {
                limit: Duration::from_secs(60),
                ..t
            },
        ),
    )
    .chain([common::Test {
        // A 10 s request timeout first.
        limit: Duration::from_secs(60),
        ..test(
            "a_stopped_fork_server_is_replaced",
            a_stopped_fork_server_is_replaced,
        )
    }])
    .chain(under_fork_and_spawn![
        terminate_with_work_in_flight_is_prompt,
        dropping_a_pool_mid_map_async_leaves_no_children,
        fifty_respawns_leak_no_descriptors_or_children,
    ])
    .collect();
    common::run(&all, &[])
}

const LIMIT: Duration = Duration::from_secs(10);

fn square(x: u64) -> u64 {
    x * x
}

fn pid_of(_: u32) -> u32 {
    std::process::id()
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn kill_self_at_7(x: u32) -> u32 {
    if x == 7 {
        // SAFETY: raising a signal on our own process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    x
}

/// Reaped children: after a pool is gone this process must have none left.
fn assert_no_children() {
    // SAFETY: plain waitpid with a null status pointer.
    let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert!(
        r == -1 && errno == Some(libc::ECHILD),
        "children left behind (waitpid -> {r}, {errno:?})"
    );
}

fn map_returns_squares_in_order<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    assert_eq!(pool.processes(), 2);
    let out = pool.map(square, 0..1000u64).unwrap();
    assert_eq!(out, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
    let out = pool
        .map(|s: String| s.to_uppercase(), ["a", "bc"].map(String::from))
        .unwrap();
    assert_eq!(out, vec!["A".to_string(), "BC".to_string()]);
}

fn chunk_sizes_one_larger_than_input_and_empty_input() {
    let pool = Pool::new(2).unwrap();
    let want: Vec<u64> = (0..37u64).map(|x| x * x).collect();
    for cs in [1, 2, 5, 36, 37, 38, 1000] {
        assert_eq!(
            pool.map_chunked(square, 0..37u64, cs).unwrap(),
            want,
            "chunksize {cs}"
        );
    }
    assert_eq!(
        pool.map(square, Vec::<u64>::new()).unwrap(),
        Vec::<u64>::new()
    );
    assert_eq!(pool.imap(square, Vec::<u64>::new()).unwrap().count(), 0);
}

fn chunksize_zero_is_refused() {
    let pool = Pool::new(1).unwrap();
    let e = pool.map_chunked(square, 0..3u64, 0).unwrap_err();
    assert!(e.to_string().contains("chunksize 0"), "{e}");
    assert!(pool.imap_chunked(square, 0..3u64, 0).is_err());
    assert_eq!(pool.map(square, 0..3u64).unwrap(), vec![0, 1, 4]);
}

fn imap_keeps_order_and_imap_unordered_gives_every_item<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    // Later items finish first: the ordered iterator must still yield in input order.
    let ms = [60u64, 1, 40, 1, 20, 1];
    let got: Vec<u64> = pool
        .imap(sleep_ms, ms)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, ms);
    let it: IMap<u64> = pool.imap_unordered(square, 0..200u64).unwrap();
    let got: BTreeSet<u64> = it.map(Result::unwrap).collect();
    assert_eq!(got, (0..200u64).map(|x| x * x).collect());
    let got: Vec<u64> = pool
        .imap_chunked(square, 0..50u64, 7)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, (0..50u64).map(|x| x * x).collect::<Vec<_>>());
    let n = pool
        .imap_unordered_chunked(square, 0..50u64, 7)
        .unwrap()
        .filter(Result::is_ok)
        .count();
    assert_eq!(n, 50);
}

fn starmap_apply_and_map_async<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let out = pool
        .starmap(
            |a: u32, b: String| format!("{b}{a}"),
            [(1, "x".to_string()), (2, "y".into())],
        )
        .unwrap();
    assert_eq!(out, vec!["x1".to_string(), "y2".to_string()]);
    assert_eq!(pool.apply(square, 12).unwrap(), 144);
    let r = pool.map_async(square, 0..10u64).unwrap();
    assert_eq!(
        r.get().unwrap(),
        (0..10u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let r = pool.map_async_chunked(square, 0..10u64, 3).unwrap();
    assert_eq!(r.get().unwrap().len(), 10);
}

fn apply_async_get_timeout_ready_and_wait<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let mut r = pool.apply_async(sleep_ms, 300).unwrap();
    assert!(!r.ready());
    assert!(r.get_timeout(Duration::from_millis(20)).is_none());
    let t = Instant::now();
    assert_eq!(r.get_timeout(LIMIT), Some(Ok(300)));
    assert!(t.elapsed() < LIMIT);
    let r = pool.apply_async(square, 3).unwrap();
    r.wait();
    assert!(r.ready());
    assert!(r.wait_timeout(Duration::ZERO));
    assert_eq!(r.get(), Ok(9));
}

fn submit_and_as_completed() {
    let pool = Pool::new(2).unwrap();
    let handles: Vec<_> = [200u64, 1, 100]
        .iter()
        .map(|&ms| pool.submit(sleep_ms, ms).unwrap())
        .collect();
    let order: Vec<u64> = as_completed(handles).map(|h| h.get().unwrap()).collect();
    assert_eq!(order.len(), 3);
    assert_eq!(order[2], 200, "the slowest comes last: {order:?}");
}

fn a_panicking_task_fails_alone_with_message_and_location<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let got: Vec<Result<u32, TaskError>> = pool
        .imap(
            |x: u32| {
                assert!(x != 3, "three is not allowed");
                x
            },
            0..6u32,
        )
        .unwrap()
        .collect();
    for (i, r) in got.iter().enumerate() {
        if i == 3 {
            match r {
                Err(TaskError::Panicked { message, location }) => {
                    assert!(message.contains("three is not allowed"), "{message}");
                    assert!(
                        location.as_deref().unwrap_or("").contains("pool.rs"),
                        "{location:?}"
                    );
                }
                other => panic!("item 3: {other:?}"),
            }
        } else {
            assert_eq!(r, &Ok(i as u32));
        }
    }
    let e = pool
        .map(|x: u32| if x == 2 { panic!("boom") } else { x }, 0..4u32)
        .unwrap_err();
    assert!(e.to_string().contains("boom"), "{e}");
    assert_eq!(pool.map(square, 0..4u64).unwrap(), vec![0, 1, 4, 9]);
}

fn a_worker_killed_mid_map_fails_exactly_its_task_and_is_replaced<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let before: BTreeSet<u32> = pool.pids().into_iter().collect();
    let t = Instant::now();
    let got: Vec<Result<u32, TaskError>> = pool.imap(kill_self_at_7, 0..20u32).unwrap().collect();
    assert!(t.elapsed() < LIMIT);
    for (i, r) in got.iter().enumerate() {
        if i == 7 {
            assert!(
                matches!(
                    r,
                    Err(TaskError::WorkerDied {
                        signal: Some(9),
                        ..
                    })
                ),
                "item 7: {r:?}"
            );
        } else {
            assert_eq!(r, &Ok(i as u32), "item {i}");
        }
    }
    // map returns the failure, and the pool is still whole afterwards.
    let e = pool.map(kill_self_at_7, 0..10u32).unwrap_err();
    assert!(matches!(e, TaskError::WorkerDied { .. }), "{e}");
    assert!(e.to_string().contains("SIGKILL"), "{e}");
    assert_eq!(pool.map(square, 0..100u64).unwrap().len(), 100);
    let after: BTreeSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(after.len(), 2);
    assert!(after != before, "a new worker pid appears");
}

fn a_worker_killed_during_apply_async_fails_that_task<const M: u8>() {
    let pool = pool::<M>(1).unwrap();
    let r = pool.apply_async(sleep_ms, 5_000).unwrap();
    let other = pool.apply_async(square, 5).unwrap();
    // Let the worker take the task, then kill it from outside.
    assert!(!r.wait_timeout(Duration::from_millis(200)));
    let pid = pool.pids()[0];
    // SAFETY: signalling our own child, not yet reaped (the pool reaps it).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    match r.get() {
        Err(TaskError::WorkerDied {
            pid: p,
            signal: Some(9),
            ..
        }) => assert_eq!(p, pid),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The task queued behind it was not lost.
    assert_eq!(other.get(), Ok(25));
    assert_ne!(pool.pids()[0], pid);
}

fn kill_self_first_time(path: String) -> u32 {
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .is_ok()
    {
        // SAFETY: raising a signal on our own process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    42
}

fn retries_rerun_a_task_whose_worker_died() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("m").to_str().unwrap().to_string();
    let pool = Pool::builder().processes(2).retries(1).build().unwrap();
    assert_eq!(pool.apply(kill_self_first_time, marker.clone()), Ok(42));
    // Without retries the same death fails the task.
    std::fs::remove_file(&marker).unwrap();
    let pool = Pool::new(2).unwrap();
    assert!(matches!(
        pool.apply(kill_self_first_time, marker),
        Err(TaskError::WorkerDied { .. })
    ));
}

fn task_timeout_fails_the_task_and_replaces_only_its_worker() {
    let pool = Pool::builder()
        .processes(2)
        .task_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let before: BTreeSet<u32> = pool.pids().into_iter().collect();
    let t = Instant::now();
    let got: Vec<Result<u64, TaskError>> = pool
        .imap(sleep_ms, [1, 10_000, 1, 1, 50, 1])
        .unwrap()
        .collect();
    let after: BTreeSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(
        before.intersection(&after).count(),
        1,
        "only the slow task's worker is replaced: {before:?} -> {after:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        matches!(got[1], Err(TaskError::Timeout { .. })),
        "{:?}",
        got[1]
    );
    for i in [0, 2, 3, 4, 5] {
        assert!(got[i].is_ok(), "item {i}: {:?}", got[i]);
    }
    assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
}

static INIT_RUNS: AtomicU32 = AtomicU32::new(0);

fn init_worker(add: u32) {
    INIT_RUNS.fetch_add(add, Ordering::SeqCst);
}

fn init_runs(_: u32) -> (u32, u32) {
    (std::process::id(), INIT_RUNS.load(Ordering::SeqCst))
}

fn initializer_runs_once_per_worker_before_tasks<const M: u8>() {
    let pool = builder::<M>()
        .processes(2)
        .initializer(init_worker, 1)
        .build()
        .unwrap();
    let got = pool.map_chunked(init_runs, 0..40u32, 1).unwrap();
    assert!(got.iter().all(|&(_, n)| n == 1), "{got:?}");
    let pids: BTreeSet<u32> = got.iter().map(|&(p, _)| p).collect();
    assert!(pids.iter().all(|p| pool.pids().contains(p)));
    assert_eq!(
        INIT_RUNS.load(Ordering::SeqCst),
        0,
        "not run in the pool's process"
    );
}

fn failing_init(_: ()) {
    panic!("no database");
}

fn a_failing_initializer_is_a_pool_error_not_a_respawn_loop<const M: u8>() {
    let t = Instant::now();
    match builder::<M>()
        .processes(2)
        .initializer(failing_init, ())
        .build()
    {
        Err(PoolError::Initializer { message, location }) => {
            assert!(message.contains("no database"), "{message}");
            assert!(location.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_no_children_but_a_fork_server::<M>();
}

#[derive(Debug, PartialEq, Deserialize)]
enum Picky {
    Fine(u32),
    Unencodable(()),
}

impl Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Picky::Fine(x) => s.serialize_newtype_variant("Picky", 0, "Fine", x),
            Picky::Unencodable(()) => Err(serde::ser::Error::custom("cannot encode this one")),
        }
    }
}

fn picky(x: u32) -> Picky {
    if x == 2 {
        Picky::Unencodable(())
    } else {
        Picky::Fine(x)
    }
}

fn an_unencodable_result_is_that_items_error() {
    let pool = Pool::new(2).unwrap();
    let got: Vec<Result<Picky, TaskError>> =
        pool.imap_chunked(picky, 0..5u32, 5).unwrap().collect();
    for (i, r) in got.iter().enumerate() {
        if i == 2 {
            match r {
                Err(TaskError::Encode(m)) => assert!(m.contains("Picky"), "{m}"),
                other => panic!("{other:?}"),
            }
        } else {
            assert_eq!(r, &Ok(Picky::Fine(i as u32)));
        }
    }
    assert!(matches!(pool.apply(picky, 2), Err(TaskError::Encode(_))));
    assert_eq!(pool.apply(picky, 3), Ok(Picky::Fine(3)));
}

fn max_tasks_per_child_recycles_workers<const M: u8>() {
    let pool = builder::<M>()
        .processes(1)
        .max_tasks_per_child(2)
        .build()
        .unwrap();
    let pids = pool.map_chunked(pid_of, 0..6u32, 1).unwrap();
    let distinct: BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{pids:?}");
    assert_eq!(pids[0], pids[1]);
    assert_eq!(pids[2], pids[3]);
    assert_eq!(pool.map(square, 0..5u64).unwrap(), vec![0, 1, 4, 9, 16]);
}

fn terminate_with_work_in_flight_is_prompt<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let r = pool.map_async_chunked(sleep_ms, [10_000u64; 8], 1).unwrap();
    assert!(!r.wait_timeout(Duration::from_millis(100)));
    let t = Instant::now();
    pool.terminate();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.get(), Err(TaskError::Closed));
    assert_eq!(pool.apply(square, 2), Err(TaskError::Closed));
    assert_no_children();
}

fn dropping_a_pool_mid_map_async_leaves_no_children<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let r = pool.map_async_chunked(sleep_ms, [10_000u64; 4], 1).unwrap();
    assert!(!r.wait_timeout(Duration::from_millis(100)));
    let t = Instant::now();
    drop(pool);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(r.get(), Err(TaskError::Closed));
    assert_no_children();
}

fn close_then_join_finishes_queued_work() {
    let pool = Pool::new(2).unwrap();
    let r = pool.map_async_chunked(sleep_ms, [50u64; 6], 1).unwrap();
    pool.close();
    assert_eq!(pool.apply(square, 1), Err(TaskError::Closed));
    pool.join();
    assert_eq!(r.get().unwrap(), vec![50; 6]);
    assert!(pool.pids().is_empty());
    assert_no_children();
}

fn processes_zero_is_refused() {
    for m in [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::ForkServer,
    ] {
        let e = Pool::builder()
            .processes(0)
            .start_method(m)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("processes >= 1"), "{e}");
    }
    assert!(Pool::new(0).is_err());
}

fn echo(s: String) -> String {
    s
}

fn large_arguments_and_results_cross_promptly() {
    let pool = Pool::new(2).unwrap();
    // Strings, because postcard copies them whole (a Vec<u8> goes byte by byte, slow in
    // a debug build).
    let items: Vec<String> = (0..6)
        .map(|i| format!("{i}{}", "x".repeat(3 << 20)))
        .collect();
    let t = Instant::now();
    let got = pool.map_chunked(echo, items.clone(), 1).unwrap();
    let took = t.elapsed();
    assert!(got == items, "a large result came back wrong");
    // 18 MiB each way through 64 KiB rings: a pool that drained results only at its
    // 20 ms health checks takes seconds here.
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn fifty_respawns_leak_no_descriptors_or_children<const M: u8>() {
    // One pool first, so lazily created process-wide state is not counted as a leak.
    drop(pool::<M>(1).unwrap());
    let before = open_fds();
    let pool = builder::<M>()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let pids: BTreeSet<u32> = pool
        .map_chunked(pid_of, 0..50u32, 1)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(pids.len(), 50, "each chunk ran in a fresh worker");
    drop(pool);
    assert_eq!(open_fds(), before, "descriptors leaked");
    assert_no_children();
}

/// As `assert_no_children`, except that under ForkServer this process's one fork server
/// may remain (its workers are the server's children, and it reaps them).
fn assert_no_children_but_a_fork_server<const M: u8>() {
    if M != FORKSERVER {
        return assert_no_children();
    }
    let me = std::process::id();
    let kids: Vec<String> = std::fs::read_dir(format!("/proc/{me}/task"))
        .unwrap()
        .flat_map(|t| std::fs::read_to_string(t.unwrap().path().join("children")))
        .flat_map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    assert!(kids.len() <= 1, "children left behind: {kids:?}");
}

fn dead_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn workers_die_with_the_pools_process<const M: u8>() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    let path = file.clone();
    let owner = common::spawn(move || {
        let pool = pool::<M>(2).unwrap();
        let pids: Vec<String> = pool.pids().iter().map(u32::to_string).collect();
        std::fs::write(&path, pids.join(" ")).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    });
    common::wait_for("the worker pids", LIMIT, || {
        std::fs::read_to_string(&file).is_ok_and(|s| s.split(' ').count() == 2)
    });
    let pids: Vec<u32> = std::fs::read_to_string(&file)
        .unwrap()
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    owner.kill().unwrap();
    let _ = owner.join();
    common::wait_for("the workers to die", LIMIT, || {
        pids.iter().all(|&p| dead_or_zombie(p))
    });
}

// --- Future: a minimal executor ---

/// Wakes the executor's thread (and records that it was woken, so a lost wake-up fails
/// the test instead of hiding behind the park timeout).
struct Unpark {
    thread: std::thread::Thread,
    woken: AtomicBool,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Runs `f` to completion on this thread, parking between polls; returns its output and
/// how many times it was polled. Panics if no wake-up comes within `LIMIT`.
fn block_on<F: Future>(f: F) -> (F::Output, u32) {
    let mut f = std::pin::pin!(f);
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return (v, polls);
        }
        let until = Instant::now() + LIMIT;
        while !unpark.woken.swap(false, Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "a pending future was never woken");
            std::thread::park_timeout(left);
        }
    }
}

/// Polls every future until all are ready (a join of many in one task, sharing a waker).
struct JoinAll<F: Future> {
    futures: Vec<Option<Pin<Box<F>>>>,
    out: Vec<Option<F::Output>>,
}

fn join_all<F: Future>(futures: Vec<F>) -> JoinAll<F> {
    let n = futures.len();
    JoinAll {
        futures: futures.into_iter().map(|f| Some(Box::pin(f))).collect(),
        out: (0..n).map(|_| None).collect(),
    }
}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<F::Output>> {
        // SAFETY: nothing is moved out of the pinned fields (the futures are boxed).
        let this = unsafe { self.get_unchecked_mut() };
        let mut pending = false;
        for (slot, out) in this.futures.iter_mut().zip(this.out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(this.out.iter_mut().map(|o| o.take().unwrap()).collect())
        }
    }
}

fn futures_resolve_under_a_parking_executor_without_busy_polling() {
    let pool = Pool::new(2).unwrap();
    let (r, polls) = block_on(pool.apply_async(sleep_ms, 300).unwrap());
    assert_eq!(r, Ok(300));
    // Woken by the waiter thread: on replies and every 20 ms slice, never in a spin.
    assert!(polls < 100, "{polls} polls for a 300 ms task");
    let (r, _) = block_on(pool.map_async(square, 0..1000u64).unwrap());
    assert_eq!(r.unwrap(), (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
    let (r, _) = block_on(pool.submit(|s: String| s.len(), "four".into()).unwrap());
    assert_eq!(r, Ok(4));
    // An already finished result is Ready at the first poll.
    let h = pool.apply_async(square, 9).unwrap();
    h.wait();
    assert_eq!(block_on(h), (Ok(81), 1));
}

fn a_join_of_many_futures_gets_every_result() {
    let pool = Pool::new(2).unwrap();
    let handles: Vec<_> = (0..300u64)
        .map(|x| pool.submit(square, x).unwrap())
        .collect();
    let (got, _) = block_on(join_all(handles));
    for (x, r) in got.into_iter().enumerate() {
        assert_eq!(r, Ok((x * x) as u64), "item {x}");
    }
    // Mixed durations, finishing out of order.
    let handles: Vec<_> = [80u64, 1, 40, 1, 20, 1]
        .iter()
        .map(|&ms| pool.apply_async(sleep_ms, ms).unwrap())
        .collect();
    let (got, _) = block_on(join_all(handles));
    assert_eq!(got, [80u64, 1, 40, 1, 20, 1].map(Ok).to_vec());
}

fn a_future_whose_worker_is_killed_resolves_to_worker_died<const M: u8>() {
    let pool = pool::<M>(1).unwrap();
    let victim = pool.pids()[0];
    let slow = pool.apply_async(sleep_ms, 5_000).unwrap();
    let behind = pool.apply_async(square, 5).unwrap();
    // Kill the worker from outside while the executor waits on the future.
    let killer = common::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: plain kill of the pool's worker.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    });
    let t = Instant::now();
    let (got, _) = block_on(join_all(vec![slow, behind]));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        matches!(
            got[0],
            Err(TaskError::WorkerDied {
                pid,
                signal: Some(9),
                ..
            }) if pid == victim
        ),
        "{:?}",
        got[0]
    );
    assert_eq!(got[1], Ok(25), "the task queued behind it still runs");
    common::join(killer, Duration::from_secs(5));
    // The replacement was started while the waiter thread was alive (under Fork it is
    // stopped for the fork; under Spawn and ForkServer it need not be), and the pool goes
    // on.
    assert_ne!(pool.pids()[0], victim);
    let (r, _) = block_on(pool.apply_async(square, 6).unwrap());
    assert_eq!(r, Ok(36));
}

fn fork_works_right_after_an_await() {
    let pool = Pool::new(1).unwrap();
    let (r, _) = block_on(pool.apply_async(sleep_ms, 50).unwrap());
    assert_eq!(r, Ok(50));
    // The waiter thread lingers, but a fork stops it first.
    let child = procshare::Process::fork(|| 7u32).expect("fork after an await");
    assert_eq!(child.join(), Ok(7));
    // A new pool (more forks) and more awaits still work.
    let other = Pool::new(1).unwrap();
    assert_eq!(block_on(other.apply_async(square, 3).unwrap()).0, Ok(9));
    assert_eq!(block_on(pool.apply_async(square, 4).unwrap()).0, Ok(16));
}

fn a_child_forked_unchecked_beside_the_waiter_can_fork_again() {
    let pool = Pool::new(1).unwrap();
    assert_eq!(block_on(pool.apply_async(sleep_ms, 20).unwrap()).0, Ok(20));
    // The waiter thread lingers now. A child forked without stopping it inherits its
    // handle but not the thread; its own fork must not wait for that thread.
    // SAFETY: the only other thread is the pool's waiter, which holds no lock the child
    // uses while it sleeps on its condvar (the child runs a fork and a join).
    let mut child = unsafe {
        procshare::Process::fork_unchecked(|| {
            let grandchild = procshare::Process::fork(|| 5u32).unwrap();
            grandchild.join().unwrap()
        })
    }
    .unwrap();
    assert_eq!(child.join_timeout(Duration::from_secs(5)), Ok(5));
}

fn dropping_the_pool_resolves_pending_futures_closed() {
    let pool = Pool::new(1).unwrap();
    let h = pool.apply_async(sleep_ms, 5_000).unwrap();
    let mut h = std::pin::pin!(h);
    let waker = Waker::from(Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    }));
    let mut cx = Context::from_waker(&waker);
    let t = Instant::now();
    assert!(h.as_mut().poll(&mut cx).is_pending());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a poll waited {:?}",
        t.elapsed()
    );
    drop(pool);
    assert_eq!(block_on(h).0, Err(TaskError::Closed));
    assert_no_children();
}

// --- zero-copy chunk maps ---

/// (first element, sum, length) of a chunk.
fn summary(chunk: &[u64]) -> (u64, u64, usize) {
    (chunk[0], chunk.iter().sum(), chunk.len())
}

fn expected_summaries(data: &[u64], chunk_len: usize) -> Vec<(u64, u64, usize)> {
    data.chunks(chunk_len)
        .map(|c| (c[0], c.iter().sum(), c.len()))
        .collect()
}

fn map_chunks_reads_arrays_and_shared_slices_in_place<const M: u8>() {
    let early: Vec<u64> = (0..5_000u64).map(|x| x * 3).collect();
    // Made before the pool (its workers inherit the mapping) and after (the descriptor
    // travels to each worker): both paths.
    let before = Array::from_slice(&early).unwrap();
    let pool = pool::<M>(2).unwrap();
    let late: Vec<u64> = (0..10_007u64).map(|x| x ^ 0x5555).collect();
    let after = Array::from_slice(&late).unwrap();
    let shared: Shared<[u64]> = Shared::from_slice(&late).unwrap();
    assert_eq!(
        pool.map_chunks(&before, 333, summary).unwrap(),
        expected_summaries(&early, 333)
    );
    for _ in 0..2 {
        // The second round uses the workers' cached mappings.
        assert_eq!(
            pool.map_chunks(&after, 1000, summary).unwrap(),
            expected_summaries(&late, 1000)
        );
        assert_eq!(
            pool.map_chunks(&shared, 77, summary).unwrap(),
            expected_summaries(&late, 77)
        );
    }
    // Every element individually.
    let copies = pool.map_chunks(&after, 1, |c: &[u64]| c[0]).unwrap();
    assert_eq!(copies, late);
    // The array is unchanged and unlocked afterwards.
    assert_eq!(after.to_vec(), late);
    assert!(!after.is_poisoned());
}

fn chunk_len_edge_cases() {
    let pool = Pool::new(2).unwrap();
    let data: Vec<u64> = (1..=10).collect();
    let a = Array::from_slice(&data).unwrap();
    let e = pool.map_chunks(&a, 0, summary).unwrap_err();
    assert!(e.to_string().contains("chunk_len 0"), "{e}");
    assert_eq!(
        pool.map_chunks(&a, 3, summary).unwrap(),
        vec![(1, 6, 3), (4, 15, 3), (7, 24, 3), (10, 10, 1)]
    );
    assert_eq!(pool.map_chunks(&a, 10, summary).unwrap(), vec![(1, 55, 10)]);
    assert_eq!(
        pool.map_chunks(&a, 1000, summary).unwrap(),
        vec![(1, 55, 10)]
    );
    let empty = Array::<u64>::zeroed(0).unwrap();
    assert_eq!(pool.map_chunks(&empty, 4, summary).unwrap(), vec![]);
    pool.for_each_chunk_mut(&empty, 4, |c: &mut [u64]| c[0] = 1)
        .unwrap();
}

fn affine(chunk: &mut [f64]) {
    for x in chunk {
        *x = *x * 1.0001 + 1.0;
    }
}

fn for_each_chunk_mut_transforms_in_place_element_by_element<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let n = 100_003;
    let start: Vec<f64> = (0..n).map(|i| i as f64 * 0.5).collect();
    let a = Array::from_slice(&start).unwrap();
    pool.for_each_chunk_mut(&a, 4096, affine).unwrap();
    pool.for_each_chunk_mut(&a, 1000, affine).unwrap();
    let got = a.to_vec();
    for (i, (&g, &s)) in got.iter().zip(&start).enumerate() {
        let want = (s * 1.0001 + 1.0) * 1.0001 + 1.0;
        assert!(g == want, "element {i}: {g} != {want}");
    }
    assert!(!a.is_poisoned());
}

const MARK: f64 = -7.0;

/// Writes the first half of a chunk, then dies if the chunk starts with `MARK`.
fn half_then_die(chunk: &mut [f64]) {
    let die = chunk[0] == MARK;
    let half = chunk.len() / 2;
    for x in &mut chunk[..half] {
        *x += 1000.0;
    }
    if die {
        // SAFETY: raising a signal on our own process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    for x in &mut chunk[half..] {
        *x += 1000.0;
    }
}

fn a_worker_killed_mid_chunk_fails_that_chunk_only<const M: u8>() {
    // With retries: an in-place chunk is still never re-run (it may be half written).
    let pool = builder::<M>().processes(2).retries(3).build().unwrap();
    let before: BTreeSet<u32> = pool.pids().into_iter().collect();
    let (n, len) = (64 * 100, 100);
    let mut start: Vec<f64> = (0..n).map(|i| i as f64).collect();
    start[5 * len] = MARK; // chunk 5 kills its worker half-way
    let a = Array::from_slice(&start).unwrap();
    let t = Instant::now();
    let out = pool
        .for_each_chunk_mut_each(&a, len, half_then_die)
        .unwrap();
    assert!(t.elapsed() < LIMIT);
    assert_eq!(out.len(), 64);
    for (c, r) in out.iter().enumerate() {
        if c == 5 {
            assert!(
                matches!(
                    r,
                    Err(TaskError::WorkerDied {
                        signal: Some(9),
                        ..
                    })
                ),
                "chunk 5: {r:?}"
            );
        } else {
            assert_eq!(r, &Ok(()), "chunk {c}");
        }
    }
    let got = a.lock().unwrap_err().into_inner().to_vec();
    for (i, (&g, &s)) in got.iter().zip(&start).enumerate() {
        let written = i / len != 5 || i % len < len / 2;
        let want = if written { s + 1000.0 } else { s };
        assert!(g == want, "element {i}: {g} != {want}");
    }
    assert!(a.is_poisoned(), "a half-written array is poisoned");
    a.clear_poison();
    a.set(5 * len, MARK);
    // The first-failure form, and the pool goes on with a replacement worker (which is
    // sent the descriptor again).
    let e = pool.for_each_chunk_mut(&a, len, half_then_die).unwrap_err();
    assert!(matches!(e, TaskError::WorkerDied { .. }), "{e}");
    let after: BTreeSet<u32> = pool.pids().into_iter().collect();
    assert!(after != before && after.len() == 2);
    let sums = pool.map_chunks(&a, len, |c: &[f64]| c.len()).unwrap();
    assert_eq!(sums, vec![len; 64]);
}

fn panic_on_negative(chunk: &mut [i32]) {
    for x in chunk {
        assert!(*x >= 0, "negative element {x}");
        *x += 1;
    }
}

fn a_panicking_chunk_fails_alone_and_poisons_the_array() {
    let pool = Pool::new(2).unwrap();
    let mut start: Vec<i32> = (0..1000).collect();
    start[555] = -1;
    let a = Array::from_slice(&start).unwrap();
    let out = pool
        .for_each_chunk_mut_each(&a, 100, panic_on_negative)
        .unwrap();
    for (c, r) in out.iter().enumerate() {
        if c == 5 {
            match r {
                Err(TaskError::Panicked { message, .. }) => {
                    assert!(message.contains("negative element -1"), "{message}")
                }
                other => panic!("chunk 5: {other:?}"),
            }
        } else {
            assert_eq!(r, &Ok(()), "chunk {c}");
        }
    }
    assert!(a.is_poisoned());
    let got = a.lock().unwrap_err().into_inner().to_vec();
    for (i, (&g, &s)) in got.iter().zip(&start).enumerate() {
        let want = if i / 100 != 5 || i < 555 { s + 1 } else { s };
        assert_eq!(g, want, "element {i}");
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn workers_unmap_arrays_the_pool_no_longer_has<const M: u8>() {
    let pool = pool::<M>(1).unwrap();
    let warm = Array::from_slice(&[1u64, 2, 3]).unwrap();
    assert_eq!(pool.map_chunks(&warm, 2, summary).unwrap().len(), 2);
    let pid = pool.pids()[0];
    let base = fd_count(pid);
    for round in 0..30u64 {
        // New arrays, often at a reused address: each must be its own segment to the
        // workers, and the ones dropped must be let go.
        let data: Vec<u64> = (0..100).map(|x| x + round * 1000).collect();
        let a = Array::from_slice(&data).unwrap();
        assert_eq!(
            pool.map_chunks(&a, 10, summary).unwrap(),
            expected_summaries(&data, 10),
            "round {round}"
        );
    }
    assert_eq!(pool.map_chunks(&warm, 2, summary).unwrap().len(), 2);
    assert_eq!(pool.pids()[0], pid);
    let now = fd_count(pid);
    assert!(
        now <= base + 2,
        "the worker holds {now} descriptors, {base} at first"
    );
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn the_waiter_thread_ends_when_no_future_waits() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(threads(), 1);
    let mut h = Box::pin(pool.apply_async(sleep_ms, 5_000).unwrap());
    let waker = Waker::from(Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    }));
    assert!(
        h.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    assert_eq!(threads(), 2, "a waiter while the future waits");
    // Dropping the pending future takes its waker back; the idle waiter leaves.
    drop(h);
    let t = Instant::now();
    common::wait_for("the waiter to exit", LIMIT, || threads() == 1);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // And comes back for the next future.
    assert_eq!(block_on(pool.apply_async(square, 2).unwrap()).0, Ok(4));
}

// --- the default start method ---

static MARK_IN_POOL_PROCESS: AtomicU32 = AtomicU32::new(0);

/// What a worker sees of a static the pool's process set at run time: the value (forked
/// worker) or 0 (spawned, or forked by the fork server: a fresh image).
fn inherited_mark(_: u32) -> u32 {
    MARK_IN_POOL_PROCESS.load(Ordering::SeqCst)
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Kills the pool's worker `victim` and waits until the pool has replaced it.
fn kill_and_wait_for_replacement(pool: &Pool, victim: u32) {
    // SAFETY: plain kill of a worker of the pool.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    common::wait_for("the replacement of a killed worker", LIMIT, || {
        let _ = pool.apply_async(square, 1).unwrap().get_timeout(SHORT);
        !pool.pids().contains(&victim)
    });
}

const SHORT: Duration = Duration::from_millis(50);

fn the_default_start_method_follows_the_process_rule() {
    MARK_IN_POOL_PROCESS.store(7, Ordering::SeqCst);
    let me = std::process::id();
    // Single-threaded: the default forks.
    let default = Pool::new(1).unwrap();
    let explicit_fork = pool::<FORK>(1).unwrap();
    assert_eq!(default.apply(inherited_mark, 0), Ok(7));
    // A thread of our own makes fork unsafe.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || rx.recv());
    assert!(matches!(
        pool::<FORK>(1),
        Err(PoolError::Start(procshare::Error::MultiThreaded { .. }))
    ));
    // The default pool's replacement is spawned (init() ran), so it sees a fresh image.
    kill_and_wait_for_replacement(&default, default.pids()[0]);
    assert_eq!(default.apply(inherited_mark, 0), Ok(0));
    assert_eq!(parent_of(default.pids()[0]), me);
    // An explicit Fork pool cannot replace its worker now: it stops, saying why.
    let victim = explicit_fork.pids()[0];
    // SAFETY: plain kill of a worker of the pool.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let e = loop {
        match explicit_fork.apply(square, 2) {
            Err(TaskError::Start(why)) => break why,
            Ok(_) | Err(TaskError::WorkerDied { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
        assert!(t.elapsed() < LIMIT, "the Fork pool never stopped");
    };
    assert!(e.contains("thread"), "{e}");
    // A new default pool in a threaded process spawns; once this process runs a fork
    // server, it uses the server (whose children are not ours).
    let spawned = Pool::new(1).unwrap();
    assert_eq!(spawned.apply(inherited_mark, 0), Ok(0));
    assert_eq!(parent_of(spawned.pids()[0]), me);
    let served = pool::<FORKSERVER>(1).unwrap();
    assert_eq!(served.apply(inherited_mark, 0), Ok(0));
    let by_default = Pool::new(1).unwrap();
    assert_eq!(by_default.apply(inherited_mark, 0), Ok(0));
    assert_ne!(parent_of(by_default.pids()[0]), me);
    tx.send(()).unwrap();
    thread.join().unwrap().unwrap();
}

fn a_worker_that_fails_its_bootstrap_stops_the_pool() {
    // The next spawn claims another executable: the worker refuses to run anything.
    procshare::process::tamper_next_spawn(procshare::process::Tamper::Executable);
    let pool = pool::<SPAWN>(1).unwrap();
    let t = Instant::now();
    match pool.apply(square, 3) {
        Err(TaskError::Start(why)) => assert!(why.contains("different executable"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < LIMIT);
    // No respawn loop: the pool stopped, with no worker left.
    assert!(pool.pids().is_empty());
    assert!(matches!(pool.apply(square, 3), Err(TaskError::Start(_))));
    drop(pool);
    assert_no_children();
    // With an initializer, `build` itself reports it.
    procshare::process::tamper_next_spawn(procshare::process::Tamper::Executable);
    match builder::<SPAWN>()
        .processes(1)
        .initializer(init_worker, 1)
        .build()
    {
        Err(PoolError::Start(e)) => assert!(e.to_string().contains("different executable")),
        other => panic!("{other:?}"),
    }
}

fn report_pid(tx: procshare::channel::Sender<u32>) {
    tx.send(std::process::id()).unwrap();
}

fn initializer_arguments_carry_handles<const M: u8>() {
    let (tx, rx) = procshare::channel::<u32>(16).unwrap();
    let pool = builder::<M>()
        .processes(2)
        .initializer(report_pid, tx)
        .build()
        .unwrap();
    let got: BTreeSet<u32> = (0..2).map(|_| rx.recv_timeout(LIMIT).unwrap()).collect();
    assert_eq!(got, pool.pids().into_iter().collect::<BTreeSet<u32>>());
    // Every sender (the pool's copy for later workers, the workers' own) goes with the
    // pool: the count of senders stays exact across the start method.
    drop(pool);
    assert_eq!(
        rx.recv_timeout(LIMIT),
        Err(procshare::RecvTimeoutError::Disconnected)
    );
}

/// A waker whose `wake` panics (a buggy executor).
struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("this executor's waker panics");
    }
}

fn a_panicking_waker_breaks_neither_fork_nor_the_other_futures() {
    let pool = Pool::new(1).unwrap();
    let mut bad = std::pin::pin!(pool.apply_async(sleep_ms, 300).unwrap());
    let mut good = std::pin::pin!(pool.apply_async(sleep_ms, 10).unwrap());
    let bad_waker = Waker::from(Arc::new(PanickingWaker));
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    });
    let good_waker = Waker::from(Arc::clone(&unpark));
    assert!(
        bad.as_mut()
            .poll(&mut Context::from_waker(&bad_waker))
            .is_pending()
    );
    assert!(
        good.as_mut()
            .poll(&mut Context::from_waker(&good_waker))
            .is_pending()
    );
    // A fork stops the waiter and wakes every waiting future: one waker panicking must
    // neither make the fork panic nor leave the other future unwoken for good.
    let forked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        procshare::Process::fork(|| 3u32)
    }));
    let child = forked
        .expect("Process::fork panicked because a waker panicked")
        .unwrap();
    assert_eq!(child.join(), Ok(3));
    assert!(
        unpark.woken.load(Ordering::SeqCst),
        "the well-behaved future was never woken"
    );
    // Both still resolve.
    let (r, _) = block_on(good.as_mut());
    assert_eq!(r, Ok(10));
    let (r, _) = block_on(bad.as_mut());
    assert_eq!(r, Ok(300));
}

fn a_future_polled_then_dropped_leaves_the_pool_usable() {
    let pool = Pool::new(1).unwrap();
    for _ in 0..3 {
        let mut h = Box::pin(pool.apply_async(sleep_ms, 200).unwrap());
        let unpark = Arc::new(Unpark {
            thread: std::thread::current(),
            woken: AtomicBool::new(false),
        });
        let waker = Waker::from(Arc::clone(&unpark));
        assert!(
            h.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        drop(h);
    }
    // The abandoned jobs' waker entries are gone, the pool still answers (the worker may
    // first finish what it already started).
    let t = Instant::now();
    assert_eq!(block_on(pool.apply_async(square, 5).unwrap()).0, Ok(25));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

fn map_chunks_over_a_zero_length_shared_slice() {
    let pool = Pool::new(2).unwrap();
    let empty: Shared<[u64]> = Shared::from_slice(&[]).unwrap();
    assert_eq!(pool.map_chunks(&empty, 1, summary).unwrap(), vec![]);
    assert_eq!(
        pool.map_chunks(&empty, usize::MAX, summary).unwrap(),
        vec![]
    );
    let one: Shared<[u64]> = Shared::from_slice(&[7]).unwrap();
    assert_eq!(
        pool.map_chunks(&one, usize::MAX, summary).unwrap(),
        vec![(7, 7, 1)]
    );
    // Zero-sized elements: every chunk starts at byte 0, and that is fine.
    let units = Array::<()>::zeroed(20).unwrap();
    assert_eq!(
        pool.map_chunks(&units, 7, |c: &[()]| c.len()).unwrap(),
        vec![7, 7, 6]
    );
    pool.for_each_chunk_mut(&units, 3, |c: &mut [()]| assert!(c.len() <= 3))
        .unwrap();
    assert!(!units.is_poisoned());
}

fn a_forked_child_cannot_use_or_break_its_parents_pool() {
    let pool = Pool::new(1).unwrap();
    let workers = pool.pids();
    // The parent's own work, sent to the worker before the fork.
    let mine = pool.apply_async(sleep_ms, 300).unwrap();
    // A Fork child borrows the pool it inherited (no `'static` bound stops it).
    let mut child = procshare::Process::fork(|| {
        let r = pool.apply(square, 3).map_err(|e| e.to_string());
        let m = pool.map(square, 0..4u64).map_err(|e| e.to_string());
        (format!("{r:?}"), format!("{m:?}"))
    })
    .unwrap();
    let (r, m) = child
        .join_timeout(Duration::from_secs(10))
        .expect("the forked child");
    assert!(
        r.contains("another process") && m.contains("another process"),
        "the child used its parent's pool: {r} / {m}"
    );
    // The parent's pool is untouched: its job completes, its worker was not replaced.
    let mut mine = mine;
    assert_eq!(mine.get_timeout(Duration::from_secs(10)), Some(Ok(300)));
    assert_eq!(pool.pids(), workers);
    assert_eq!(pool.apply(square, 4), Ok(16));
}

/// A result whose `Serialize` panics in the worker, for odd inputs.
#[derive(Deserialize, Debug, PartialEq)]
struct OddPanics(u64);

impl Serialize for OddPanics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % 2 == 1 {
            panic!("odd results cannot be sent");
        }
        self.0.serialize(s)
    }
}

fn odd_panics(x: u64) -> OddPanics {
    OddPanics(x)
}

fn a_result_whose_serialize_panics_fails_that_item_alone() {
    let pool = Pool::new(2).unwrap();
    let pids = pool.pids();
    let got: Vec<Result<OddPanics, TaskError>> =
        pool.imap_chunked(odd_panics, 0..8u64, 4).unwrap().collect();
    for (i, r) in got.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(r, &Ok(OddPanics(i as u64)), "item {i}: {got:?}");
        } else {
            assert!(
                matches!(r, Err(TaskError::Panicked { message, .. }) if message.contains("odd results")),
                "item {i}: {r:?}"
            );
        }
    }
    // A panic in a user's Serialize is that item's failure, not a worker's death.
    assert_eq!(pool.pids(), pids);
    // Nor is a panic in an argument's Deserialize: its chunk fails, the other runs.
    let got: Vec<Result<u64, TaskError>> = pool
        .imap_chunked(
            |a: PanicsWhenDecoded| a.0,
            [0, 1, 2, 5, 6, 7].map(PanicsWhenDecoded),
            3,
        )
        .unwrap()
        .collect();
    assert_eq!(got[..3], [Ok(0), Ok(1), Ok(2)], "{got:?}");
    for r in &got[3..] {
        assert!(
            matches!(r, Err(TaskError::Panicked { message, .. }) if message.contains("five")),
            "{r:?}"
        );
    }
    assert_eq!(pool.pids(), pids);
}

/// An argument whose `Deserialize` panics in the worker for 5.
#[derive(Serialize, Debug)]
struct PanicsWhenDecoded(u64);

impl<'de> Deserialize<'de> for PanicsWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        assert!(v != 5, "five cannot be decoded");
        Ok(PanicsWhenDecoded(v))
    }
}

/// Sets the soft RLIMIT_NOFILE of process `pid`; returns the old one.
fn set_nofile_of(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads/writes valid rlimit structs for the duration of the call.
    unsafe {
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    old.rlim_cur
}

fn a_worker_out_of_descriptors_fails_one_chunk_map_then_recovers() {
    let pool = Pool::new(1).unwrap();
    let pid = pool.pids()[0];
    let data: Vec<u64> = (1..=100).collect();
    // The worker cannot take one more descriptor: the array's is lost on the way in
    // (`MSG_CTRUNC`). The limit bounds descriptor numbers, not counts: set it to the
    // lowest free number (retried, should a descriptor the worker held for a moment
    // have hidden a lower one).
    // Every array stays alive until the end: dropping one makes the pool tell the worker
    // to forget it, and the descriptor the worker then closes would open a hole below the
    // limit just set (the next descriptor would fit, and the map would succeed).
    let mut failed = None;
    let mut kept = Vec::new();
    let mut a = Array::from_slice(&data).unwrap();
    for _ in 0..10 {
        // A segment this worker has not seen.
        kept.push(std::mem::replace(&mut a, Array::from_slice(&data).unwrap()));
        let open: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_string_lossy().parse().ok())
            .collect();
        let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
        let old = set_nofile_of(pid, lowest_free);
        let r = pool.map_chunks_each(&a, 100, summary).unwrap();
        set_nofile_of(pid, old);
        if r[0].is_err() {
            failed = Some(r);
            break;
        }
    }
    let r = failed.expect("the worker never ran out of descriptors");
    assert!(matches!(&r[..], [Err(TaskError::Decode(_))]), "{r:?}");
    // Once it can, the next map over the same array works (the descriptor is sent again).
    let t = Instant::now();
    assert_eq!(
        pool.map_chunks(&a, 50, summary).unwrap(),
        expected_summaries(&data, 50)
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(pool.pids(), vec![pid]);
}

// --- hostile review, second round: Spawn/ForkServer workers at chosen points ---

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill of a process this test started (directly or through the pool).
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A spawned worker stopped during its bootstrap (before it could take a task) and let go
/// later: the chunk sent to it meanwhile never ran, so `task_timeout` must not count
/// the bootstrap against it.
fn task_timeout_does_not_count_a_workers_bootstrap<const M: u8>() {
    // The worker is stopped right after `build` returns, normally long before its new
    // image reaches `init()`; should it have said READY already (a lucky scheduling), the
    // 200 ms rightly run from then: try again with a fresh pool. Before the fix every
    // attempt failed.
    let mut failures = Vec::new();
    for _ in 0..3 {
        // A fork server's child bootstraps in microseconds (the server is an image
        // stopped in `init()` already): a helper watching the server's children stops it
        // as it appears. A spawned worker first has an exec to do.
        let stopper = (M == FORKSERVER).then(stop_the_next_child_of_this_fork_server);
        let pool = builder::<M>()
            .processes(1)
            .task_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let pid = pool.pids()[0];
        match stopper {
            Some(s) => common::join(s, LIMIT),
            None => signal(pid, libc::SIGSTOP),
        }
        let mut r = pool.apply_async(square, 3).unwrap();
        if r.wait_timeout(Duration::from_millis(600)) {
            // SAFETY: plain kill; the worker may be gone already.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            failures.push(format!("{:?}", r.get()));
            continue;
        }
        signal(pid, libc::SIGCONT);
        assert_eq!(r.get_timeout(LIMIT), Some(Ok(9)));
        assert_eq!(pool.pids(), vec![pid], "the worker was not killed");
        // Still enforced once the worker runs.
        assert!(matches!(
            pool.apply(sleep_ms, 5_000),
            Err(TaskError::Timeout { .. })
        ));
        return;
    }
    panic!("the task ended while its worker was stopped in its bootstrap: {failures:?}");
}

fn children_of(pid: u32) -> BTreeSet<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Starts this process's fork server (if not yet) and a helper process that SIGSTOPs the
/// server's next child the moment it appears.
fn stop_the_next_child_of_this_fork_server() -> procshare::Child<()> {
    let warm = pool::<FORKSERVER>(1).unwrap();
    let server = parent_of(warm.pids()[0]);
    drop(warm);
    common::wait_for("the server to reap its child", LIMIT, || {
        children_of(server).is_empty()
    });
    let ready = procshare::Value::new(0u32).unwrap();
    let flag = ready.clone();
    let helper = common::spawn(move || {
        *flag.lock().unwrap() = 1;
        let until = Instant::now() + LIMIT;
        while Instant::now() < until {
            if let Some(&p) = children_of(server).iter().next() {
                signal(p, libc::SIGSTOP);
                return;
            }
        }
        panic!("the fork server started no child");
    });
    common::wait_for("the helper", LIMIT, || *ready.lock().unwrap() == 1);
    helper
}

/// SIGKILL of a worker before it finished its bootstrap is a death (replaced), not a
/// bootstrap failure (which would stop the pool).
fn a_worker_killed_mid_bootstrap_is_replaced<const M: u8>() {
    let pool = builder::<M>().processes(1).retries(1).build().unwrap();
    let pid = pool.pids()[0];
    signal(pid, libc::SIGKILL);
    assert_eq!(pool.map(square, 0..20u64).unwrap().len(), 20);
    let now = pool.pids();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], pid);
}

/// The fork server killed while its workers run: they die with it (they carry
/// PR_SET_PDEATHSIG towards it), their chunks fail or are retried, and the pool starts
/// replacements from a new server instead of hanging or stopping.
fn killing_the_fork_server_mid_map_neither_hangs_nor_stops_the_pool() {
    let pool = builder::<FORKSERVER>().processes(2).build().unwrap();
    let server = parent_of(pool.pids()[0]);
    assert_ne!(server, std::process::id());
    let mut r = pool.map_async_chunked(sleep_ms, [300u64; 6], 1).unwrap();
    assert!(!r.wait_timeout(Duration::from_millis(100)));
    signal(server, libc::SIGKILL);
    let t = Instant::now();
    match r.get_timeout(LIMIT).expect("the map hung") {
        Ok(v) => assert_eq!(v, vec![300; 6]),
        Err(TaskError::WorkerDied { .. }) => {}
        Err(e) => panic!("{e:?}"),
    }
    assert!(t.elapsed() < LIMIT);
    assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
    let new_server = parent_of(pool.pids()[0]);
    assert_ne!(new_server, server);
}

fn chunk_pid(chunk: &[u64]) -> (u64, u32) {
    (chunk.iter().sum(), std::process::id())
}

fn add_one(chunk: &mut [u64]) {
    chunk.iter_mut().for_each(|x| *x += 1);
}

/// max_tasks_per_child(1) with chunk maps: each fresh worker must be sent the segment.
fn max_tasks_one_with_chunk_maps_resends_the_segment<const M: u8>() {
    let pool = builder::<M>()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let data: Vec<u64> = (0..1000).collect();
    let a = Array::from_slice(&data).unwrap();
    let got = pool.map_chunks(&a, 50, chunk_pid).unwrap();
    let sums: Vec<u64> = got.iter().map(|g| g.0).collect();
    let want: Vec<u64> = data.chunks(50).map(|c| c.iter().sum()).collect();
    assert_eq!(sums, want);
    let pids: BTreeSet<u32> = got.iter().map(|g| g.1).collect();
    assert_eq!(pids.len(), 20, "each chunk ran in a fresh worker");
    pool.for_each_chunk_mut(&a, 100, add_one).unwrap();
    assert_eq!(a.to_vec(), (1..=1000).collect::<Vec<u64>>());
    let s: Shared<[u64]> = Shared::from_slice(&data).unwrap();
    assert_eq!(
        pool.map_chunks(&s, 250, chunk_pid)
            .unwrap()
            .iter()
            .map(|g| g.0)
            .sum::<u64>(),
        data.iter().sum::<u64>()
    );
}

/// The default start method, with threads started between tasks and workers recycled
/// after every chunk: replacements are spawned and chunk maps still reach them.
fn threads_started_between_tasks_under_the_default_method() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let data: Vec<u64> = (0..400).collect();
    let a = Array::from_slice(&data).unwrap();
    assert_eq!(pool.map_chunks(&a, 100, chunk_pid).unwrap().len(), 4);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || rx.recv());
    for _ in 0..3 {
        let got = pool.map_chunks(&a, 100, chunk_pid).unwrap();
        assert_eq!(
            got.iter().map(|g| g.0).sum::<u64>(),
            data.iter().sum::<u64>()
        );
        assert_eq!(pool.map(square, 0..8u64).unwrap().len(), 8);
    }
    tx.send(()).unwrap();
    thread.join().unwrap().unwrap();
    assert_eq!(pool.map(square, 0..8u64).unwrap().len(), 8);
}

/// terminate() and drop within 1 s with work in flight, one worker stopped (SIGSTOP)
/// mid-task and one mid-chunk-map; nothing of the pool survives.
fn terminate_and_drop_with_a_stopped_worker_are_prompt<const M: u8>() {
    for terminate in [true, false] {
        let pool = pool::<M>(2).unwrap();
        let pids = pool.pids();
        let a = Array::from_slice(&[1u64; 64]).unwrap();
        let r = pool.map_async_chunked(sleep_ms, [10_000u64; 8], 1).unwrap();
        assert!(!r.wait_timeout(Duration::from_millis(100)));
        signal(pids[0], libc::SIGSTOP);
        let t = Instant::now();
        if terminate {
            pool.terminate();
        } else {
            drop(pool);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(r.get(), Err(TaskError::Closed));
        drop(a);
        common::wait_for("the workers to be gone", Duration::from_secs(1), || {
            pids.iter().all(|&p| dead_or_zombie(p))
        });
        assert_no_children_but_a_fork_server::<M>();
    }
}

/// Ctrl-C: SIGINT to the process group of a program with a pool leaves no process of it.
fn sigint_to_the_process_group_leaves_no_orphans<const M: u8>() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    let path = file.clone();
    let owner = procshare::Process::builder()
        .daemon(true)
        .process_group(true)
        .fork(move || {
            let pool = pool::<M>(2).unwrap();
            let mut pids = pool.pids();
            if M == FORKSERVER {
                pids.push(parent_of(pids[0]));
            }
            let _r = pool.map_async_chunked(sleep_ms, [60_000u64; 4], 1).unwrap();
            let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
            std::fs::write(&path, pids.join(" ")).unwrap();
            std::thread::sleep(Duration::from_secs(60));
        })
        .unwrap();
    common::wait_for("the pids", LIMIT, || {
        std::fs::read_to_string(&file).is_ok_and(|s| s.split(' ').count() >= 2)
    });
    let pids: Vec<u32> = std::fs::read_to_string(&file)
        .unwrap()
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    // SAFETY: killpg takes plain integers; the group is the owner's.
    assert_eq!(unsafe { libc::killpg(owner.pid() as i32, libc::SIGINT) }, 0);
    common::wait_for("every process of the program to end", LIMIT, || {
        pids.iter().all(|&p| dead_or_zombie(p))
    });
    let _ = common::ended_within(&mut { owner }, LIMIT);
}

/// 100k items under ForkServer: no hang, no descriptor growth.
fn a_map_of_100k_items_leaks_no_descriptors<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
    let before = open_fds();
    let out = pool.map(square, 0..100_000u64).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, &v)| v == (i as u64) * (i as u64))
    );
    let got: Vec<Result<u64, TaskError>> = pool
        .imap_unordered_chunked(square, 0..100_000u64, 1)
        .unwrap()
        .collect();
    assert_eq!(got.len(), 100_000);
    assert!(got.iter().all(Result::is_ok));
    assert_eq!(open_fds(), before, "descriptors grew");
}

/// task_timeout under Spawn and ForkServer: only the slow task fails, the pool carries on.
fn task_timeout_under_every_method<const M: u8>() {
    let pool = builder::<M>()
        .processes(2)
        .task_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let got: Vec<Result<u64, TaskError>> = pool
        .imap(sleep_ms, [1, 10_000, 1, 1, 50, 1])
        .unwrap()
        .collect();
    assert!(
        matches!(got[1], Err(TaskError::Timeout { .. })),
        "{:?}",
        got[1]
    );
    for i in [0, 2, 3, 4, 5] {
        assert!(got[i].is_ok(), "item {i}: {:?}", got[i]);
    }
    assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
}

/// A child forked from a process whose pool has Spawn or ForkServer workers: it can
/// neither use the pool nor, by `terminate`, kill or reap the parent's workers.
fn a_forked_child_cannot_use_or_terminate_a_spawned_pool<const M: u8>() {
    let pool = pool::<M>(2).unwrap();
    let workers = pool.pids();
    let mine = pool.map_async_chunked(sleep_ms, [200u64; 4], 1).unwrap();
    let mut child = procshare::Process::fork(|| {
        let r = pool.apply(square, 3).map_err(|e| e.to_string());
        pool.terminate();
        format!("{r:?}")
    })
    .unwrap();
    let r = child.join_timeout(LIMIT).expect("the forked child");
    assert!(r.contains("another process"), "{r}");
    let mut mine = mine;
    assert_eq!(mine.get_timeout(LIMIT), Some(Ok(vec![200u64; 4])));
    assert_eq!(pool.pids(), workers);
    assert_eq!(pool.apply(square, 4), Ok(16));
}

/// A worker stopped (SIGSTOP) in its bootstrap and never let go: its bootstrap timeout
/// stops the pool with `TaskError::Start` (no hang, no respawn loop), nothing left.
///
/// Should the stop land after the worker's handshake (a fork server's child gets there in
/// microseconds), the worker is merely a stopped worker, whose task is waited for as any
/// task that never returns (see the failure table): let it go and try again.
fn a_worker_stopped_in_its_bootstrap_stops_the_pool_in_time<const M: u8>() {
    for _ in 0..3 {
        let stopper = (M == FORKSERVER).then(stop_the_next_child_of_this_fork_server);
        let pool = pool::<M>(1).unwrap();
        let pid = pool.pids()[0];
        match stopper {
            Some(s) => common::join(s, LIMIT),
            None => signal(pid, libc::SIGSTOP),
        }
        let t = Instant::now();
        let mut r = pool.apply_async(square, 3).unwrap();
        let Some(r) = r.get_timeout(Duration::from_secs(12)) else {
            signal(pid, libc::SIGCONT);
            continue; // stopped after its bootstrap
        };
        match r {
            Err(TaskError::Start(why)) => assert!(why.contains("init()"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
        assert!(pool.pids().is_empty());
        drop(pool);
        common::wait_for("the stopped worker to be gone", LIMIT, || {
            dead_or_zombie(pid)
        });
        assert_no_children_but_a_fork_server::<M>();
        return;
    }
    panic!("the worker was never stopped in its bootstrap");
}

/// terminate() within 1 s even while the fork server is stopped (SIGSTOP): the workers'
/// ends are learnt from their pidfds, not only from the server's reports.
fn terminate_is_prompt_while_the_fork_server_is_stopped() {
    let pool = pool::<FORKSERVER>(2).unwrap();
    let pids = pool.pids();
    let server = parent_of(pids[0]);
    let mut r = pool.map_async_chunked(sleep_ms, [10_000u64; 4], 1).unwrap();
    assert!(!r.wait_timeout(Duration::from_millis(100)));
    signal(server, libc::SIGSTOP);
    let t = Instant::now();
    pool.terminate();
    let took = t.elapsed();
    signal(server, libc::SIGCONT);
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(r.get_timeout(LIMIT), Some(Err(TaskError::Closed)));
}

/// Workers recycled after every task under Spawn/ForkServer, each given the initializer's
/// channel sender anew: the sender count stays exact (Disconnected once the pool is gone).
fn recycled_workers_keep_the_initializers_handles_counted<const M: u8>() {
    let (tx, rx) = procshare::channel::<u32>(64).unwrap();
    let pool = builder::<M>()
        .processes(2)
        .max_tasks_per_child(1)
        .initializer(report_pid, tx)
        .build()
        .unwrap();
    let ran: BTreeSet<u32> = pool
        .map_chunked(pid_of, 0..10u32, 1)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ran.len(), 10);
    let mut reported = BTreeSet::new();
    while reported.len() < 10 + 2 {
        reported.insert(rx.recv_timeout(LIMIT).unwrap());
    }
    assert!(ran.is_subset(&reported), "{ran:?} / {reported:?}");
    drop(pool);
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(_) => {} // a replacement started as the pool went
            Err(e) => {
                assert_eq!(e, procshare::RecvTimeoutError::Disconnected);
                break;
            }
        }
    }
}

/// As `fifty_respawns_leak_no_descriptors_or_children`, under ForkServer (whose workers
/// are the server's children): the descriptors of fifty recycled workers (pidfds, status
/// and result sockets, control sockets, rings) are all closed, killed ones' too.
fn fifty_forkserver_respawns_leak_no_descriptors() {
    drop(pool::<FORKSERVER>(1).unwrap());
    let before = open_fds();
    let pool = builder::<FORKSERVER>()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let pids: BTreeSet<u32> = pool
        .map_chunked(pid_of, 0..50u32, 1)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(pids.len(), 50, "each chunk ran in a fresh worker");
    for _ in 0..5 {
        kill_and_wait_for_replacement(&pool, pool.pids()[0]);
    }
    drop(pool);
    assert_eq!(open_fds(), before, "descriptors leaked");
}

/// The fork server stopped (SIGSTOP) when the pool needs a replacement: the request
/// waits up to the bootstrap timeout, then the server is killed (its workers with it)
/// and a new one serves; the pool carries on. No hang.
fn a_stopped_fork_server_is_replaced() {
    let pool = pool::<FORKSERVER>(2).unwrap();
    let pids = pool.pids();
    let server = parent_of(pids[0]);
    signal(server, libc::SIGSTOP);
    signal(pids[0], libc::SIGKILL);
    let t = Instant::now();
    loop {
        match pool.apply(square, 3) {
            Ok(9) => break,
            Err(TaskError::WorkerDied { .. }) => {}
            other => panic!("{other:?} after {:?}", t.elapsed()),
        }
        assert!(t.elapsed() < Duration::from_secs(25), "no recovery");
    }
    assert!(dead_or_zombie(server) || parent_of(pool.pids()[0]) != server);
    assert_ne!(parent_of(pool.pids()[0]), server);
    assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
}

static ENCODED: AtomicU32 = AtomicU32::new(0);

/// An initializer argument whose `Serialize` panics from its second use on (in the
/// pool's process, where a spawned worker's argument is encoded).
#[derive(Deserialize, Clone, Debug)]
struct EncodesOnce(u32);

impl Serialize for EncodesOnce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if ENCODED.fetch_add(1, Ordering::SeqCst) >= 1 {
            panic!("this argument cannot be encoded twice");
        }
        self.0.serialize(s)
    }
}

fn init_encodes_once(_: EncodesOnce) {}

/// A replacement worker whose initializer argument panics while being encoded (in the
/// pool's process): the pool stops with `TaskError::Start` saying so; the panic does not
/// escape into the caller, and later calls return at once instead of hanging.
fn an_initializer_argument_that_panics_when_encoded_stops_the_pool<const M: u8>() {
    let pool = builder::<M>()
        .processes(1)
        .initializer(init_encodes_once, EncodesOnce(1))
        .build()
        .unwrap();
    assert_eq!(pool.apply(square, 2), Ok(4));
    signal(pool.pids()[0], libc::SIGKILL);
    let t = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loop {
            match pool.apply(square, 3) {
                Err(TaskError::WorkerDied { .. }) => {}
                other => break other,
            }
            assert!(t.elapsed() < LIMIT);
        }
    }));
    let r = r.expect("the encoder's panic escaped into the pool's caller");
    match r {
        Err(TaskError::Start(why)) => assert!(why.contains("cannot be encoded twice"), "{why}"),
        other => panic!("{other:?}"),
    }
    let t = Instant::now();
    assert!(matches!(pool.apply(square, 3), Err(TaskError::Start(_))));
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// terminate() right after `build`, with every worker still in its bootstrap (an exec, a
/// fork server's fork): within 1 s, nothing left.
fn terminate_during_the_workers_bootstrap_is_prompt<const M: u8>() {
    let pool = pool::<M>(8).unwrap();
    let pids = pool.pids();
    let r = pool.map_async_chunked(square, 0..64u64, 1).unwrap();
    let t = Instant::now();
    pool.terminate();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(matches!(r.get(), Ok(_) | Err(TaskError::Closed)));
    common::wait_for("the workers to be gone", Duration::from_secs(1), || {
        pids.iter().all(|&p| dead_or_zombie(p))
    });
    assert_no_children_but_a_fork_server::<M>();
}
