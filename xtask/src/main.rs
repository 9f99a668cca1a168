//! Project tasks. `cargo xtask bench` will run the engine against qemu-img side by side.

fn main() {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some(t) => {
            eprintln!("xtask: unknown task '{t}' (no task is implemented yet)");
            std::process::exit(2);
        }
        None => {
            eprintln!("usage: cargo xtask <task>");
            std::process::exit(2);
        }
    }
}
