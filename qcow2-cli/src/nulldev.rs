//! QEMU's `null-co` block driver for `io`: a device of a given size that drops writes and
//! reads zeros (`read-zeroes=on`) or leaves the read buffer as it was (QEMU's default,
//! the fastest read), with no cluster information.

use crate::io::BlockDev;

/// A `null-co` device.
pub struct NullDev {
    size: u64,
    read_zeroes: bool,
    read_only: bool,
}

impl NullDev {
    /// A device from the driver's options (`size`, `read-zeroes`, `latency-ns`); other
    /// options are refused with QEMU's message.
    pub fn open(options: &[(String, String)], read_only: bool) -> Result<Self, String> {
        let mut dev = NullDev {
            size: 1 << 30,
            read_zeroes: false,
            read_only,
        };
        for (k, v) in options {
            match k.as_str() {
                "size" => {
                    dev.size = crate::size::parse_size(v)
                        .map_err(|_| "Parameter 'size' expects a size".to_string())?
                }
                "read-zeroes" => {
                    dev.read_zeroes = match v.as_str() {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err("Parameter 'read-zeroes' expects 'on' or 'off'".into()),
                    }
                }
                "latency-ns" => {
                    v.parse::<u64>()
                        .map_err(|_| "Parameter 'latency-ns' expects a number".to_string())?;
                }
                _ => {
                    return Err(format!(
                        "Block protocol 'null-co' doesn't support the option '{k}'"
                    ))
                }
            }
        }
        Ok(dev)
    }
}

impl BlockDev for NullDev {
    fn format_name(&self) -> &'static str {
        "null-co"
    }
    fn protocol_name(&self) -> Option<&'static str> {
        Some("null-co")
    }
    fn has_info(&self) -> bool {
        false
    }
    fn length(&mut self) -> Result<u64, i32> {
        Ok(self.size)
    }
    fn read(&mut self, _offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }
    fn write(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), i32> {
        Ok(())
    }
    fn write_compressed(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), i32> {
        Err(crate::io::ENOTSUP)
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), i32> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), i32> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), i32> {
        Ok(())
    }
    fn truncate(&mut self, _len: u64) -> Result<(), i32> {
        Err(crate::io::ENOTSUP)
    }
    fn is_allocated(&mut self, _offset: u64, len: u64) -> Result<(bool, u64), i32> {
        Ok((true, len))
    }
    fn info(&mut self) -> (u64, u64) {
        (0, 0)
    }
    fn specific_info(&mut self) -> Vec<String> {
        Vec::new()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}
