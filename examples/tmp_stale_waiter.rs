use std::time::{Duration, Instant};
fn round(tx: &procshare::channel::Sender<u64>, rx: &procshare::channel::Receiver<u64>) -> f64 {
    const N: u64 = 2_000_000;
    let t0 = Instant::now();
    for i in 0..N {
        tx.try_send(i).unwrap();
        assert_eq!(rx.try_recv(), Ok(i));
    }
    t0.elapsed().as_nanos() as f64 / N as f64
}
fn main() {
    for _ in 0..5 {
        let (tx, rx) = procshare::channel::<u64>(64).unwrap();
        let fresh = round(&tx, &rx);
        // A receiver asleep in recv, SIGKILLed.
        let child = procshare::fork::fork(|| {
            let _ = rx.recv();
            0
        })
        .unwrap();
        while tx.__not_empty_waiters() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(30));
        let mut child = child;
        child.signal(procshare::fork::signal::KILL).unwrap();
        child.wait().unwrap();
        let stale = tx.__not_empty_waiters();
        let after = round(&tx, &rx);
        println!(
            "fresh {fresh:.1} ns, after a killed sleeper (count was {stale}) {after:.1} ns per send+recv; count now {}",
            tx.__not_empty_waiters()
        );
    }
}
