//! Process-shared synchronisation: in-place `#[repr(C)]` types that work in any shared
//! mapping, plus Python's `Value` and `Array` cells.

mod barrier;
mod condvar;
mod event;
pub(crate) mod mutex;
mod semaphore;
mod value;

pub use barrier::{Barrier, BarrierWaitResult};
pub use condvar::{Condvar, WaitTimeoutResult};
pub use event::Event;
pub use mutex::{Mutex, MutexGuard, RawMutex};
pub use semaphore::Semaphore;
pub use value::{Array, ArrayGuard, Value};
