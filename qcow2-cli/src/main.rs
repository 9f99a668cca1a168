//! The `qcow2` command (being built).

fn main() {
    eprintln!("qcow2: no subcommand is implemented yet");
    std::process::exit(1);
}
