//! Python's `Pipe()` sender/receiver program: one process sends a greeting through one end
//! of a pipe, another receives it from the other end.
//!
//! ```sh
//! cargo run --example pipe_sender_receiver
//! ```

use std::time::Duration;

use procshare::fork::fork;
use procshare::pipe;

fn main() -> procshare::Result<()> {
    // Python: parent_conn, child_conn = Pipe()
    let (parent_conn, child_conn) = pipe()?;

    // Python: p1 = Process(target=sender, args=(parent_conn,))
    let mut sender = fork(|| {
        parent_conn
            .send("Hello from the sender process!")
            .expect("send");
        0
    })?;
    // Python: p2 = Process(target=receiver, args=(child_conn,))
    let mut receiver = fork(|| {
        // A bounded wait: if the sender died, say so instead of hanging.
        match child_conn.recv_timeout::<String>(Duration::from_secs(10)) {
            Ok(message) => {
                println!("Received: {message}");
                0
            }
            Err(e) => {
                eprintln!("receiver: {e}");
                1
            }
        }
    })?;
    // The parent holds both ends too; it only waits for its children.
    let sent = sender.wait()?;
    let received = receiver.wait()?;
    assert!(sent.success() && received.success(), "{sent}, {received}");
    Ok(())
}
