//! Python's `Pipe()` sender/receiver program: one process sends a greeting through one end
//! of a pipe, another receives it from the other end.
//!
//! ```sh
//! cargo run --example pipe_sender_receiver
//! ```

use std::time::Duration;

use procshare::{Process, pipe};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procshare::init();
    // Python: parent_conn, child_conn = Pipe()
    let (parent_conn, child_conn) = pipe()?;

    // Python: p1 = Process(target=sender, args=(parent_conn,))
    let sender = Process::fork(|| {
        parent_conn
            .send("Hello from the sender process!")
            .expect("send");
    })?;
    // Python: p2 = Process(target=receiver, args=(child_conn,))
    let receiver = Process::fork(|| {
        // A bounded wait: if the sender died, say so instead of hanging.
        let message = child_conn.recv_timeout::<String>(Duration::from_secs(10));
        message.map_err(|e| e.to_string())
    })?;
    // The parent holds both ends too; it only waits for its children.
    sender.join()?;
    // Python: p2.join(); the value the receiver returned comes back with it.
    let message = receiver.join()??;
    println!("Received: {message}");
    Ok(())
}
