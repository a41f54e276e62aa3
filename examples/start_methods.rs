//! Python's start-method program (`set_start_method` / `get_context` with `add(a, b)`),
//! plus what Python cannot give back: the return value, and why there is none.
//!
//! ```sh
//! cargo run --example start_methods
//! ```

use std::time::Duration;

use procshare::{Process, ProcessError, StartMethod, Value, current_process};

fn add((a, b): (i32, i32)) -> i32 {
    println!(
        "{}: addition of two numbers is {}",
        current_process().name(),
        a + b
    );
    a + b
}

fn count_to(v: Value<u64>) -> u64 {
    for _ in 0..1000 {
        *v.lock().unwrap() += 1;
    }
    v.get()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First line of main: Spawn and ForkServer children start here and never return.
    procshare::init();

    // Python: ctx = mp.get_context(method); p = ctx.Process(target=add, args=(1, 1))
    for method in [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::ForkServer,
    ] {
        let p = Process::builder()
            .name(format!("{method:?}-child"))
            .start_method(method)
            .spawn(add, (1, 1))?;
        // Python's join() returns None; this one returns add's value.
        println!("{method:?}: joined, returned {}", p.join()?);
    }

    // A shared Value goes to children of every start method (its descriptor travels with
    // the argument under Spawn and ForkServer).
    let total = Value::new(0u64)?;
    let children = [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::ForkServer,
    ]
    .map(|m| {
        Process::builder()
            .start_method(m)
            .spawn(count_to, total.clone())
    });
    for child in children {
        child?.join()?;
    }
    println!("Value: three children counted to {}", total.get());

    // Why there is no value, in words.
    let p = Process::spawn(|()| -> i32 { panic!("no luck today") }, ())?;
    if let Err(e @ ProcessError::Panicked { .. }) = p.join() {
        println!("panic: {e}");
    }
    let mut p = Process::spawn(
        |ms: u64| std::thread::sleep(Duration::from_millis(ms)),
        10_000,
    )?;
    assert_eq!(
        p.join_timeout(Duration::from_millis(50)),
        Err(ProcessError::Timeout)
    );
    p.terminate()?;
    println!(
        "terminated: {}",
        p.join_timeout(Duration::from_secs(5)).unwrap_err()
    );
    Ok(())
}
