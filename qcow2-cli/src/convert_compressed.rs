//! `convert -c`: every non-zero target cluster is compressed on a pool of worker threads
//! and the results are written in guest order (see the parent module's documentation).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use qcow2_image::{compress_cluster, Image};

use super::{chunk_len, is_zero, write_error, CopyPlan, Run, Sources};
use crate::progress::Progress;
use crate::CliError;

/// A compressed cluster coming back from a worker: sequence number, guest offset, the
/// cluster's data and its compressed form (`None`: write it uncompressed).
type Compressed = (u64, u64, Vec<u8>, Option<Vec<u8>>);

/// Copies with compression on worker threads, writing in guest order.
pub(super) fn copy_compressed(
    sources: &mut Sources,
    img: &mut Image,
    plan: &CopyPlan,
    progress: &mut Progress,
    data_total: u64,
) -> Result<(), CliError> {
    let total = sources.total();
    let cs = img.cluster_size();
    let ctype = img.compression_type();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let window = (4 * workers) as u64;
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, u64, Vec<u8>)>(2 * workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<Compressed>();
        for _ in 0..workers {
            let rx = Arc::clone(&job_rx);
            let tx = res_tx.clone();
            scope.spawn(move || loop {
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                let Ok((seq, off, data)) = job else { return };
                let packed = compress_cluster(ctype, cs, &data);
                if tx.send((seq, off, data, packed)).is_err() {
                    return;
                }
            });
        }
        drop(res_tx);

        let mut pending: BTreeMap<u64, Compressed> = BTreeMap::new();
        let mut next_write = 0u64;
        let mut next_seq = 0u64;
        let mut done = 0u64;
        // Receives one result and writes every result that is next in order.
        let mut drain_one = |pending: &mut BTreeMap<u64, Compressed>,
                             next_write: &mut u64,
                             img: &mut Image|
         -> Result<(), CliError> {
            let r = res_rx
                .recv()
                .map_err(|_| CliError::new("compression worker failed"))?;
            pending.insert(r.0, r);
            while let Some((_, off, data, packed)) = pending.remove(next_write) {
                let res = match packed {
                    Some(c) => img.write_compressed_prepared(off, &c),
                    None => img.write(off, &data),
                };
                res.map_err(|e| write_error(off, &crate::io::strerror(e.errno())))?;
                *next_write += 1;
                done += data.len() as u64;
                progress.set_ratio(done.min(data_total), data_total);
            }
            Ok(())
        };

        let mut result = Ok(());
        let mut off = 0u64;
        let mut buf = Vec::new();
        'outer: while off < total {
            let len = chunk_len(off, total, cs);
            let runs = match sources.runs(off, len, plan.top_only) {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // Zero runs on a target that does not read as zeros are zeroed; runs left to
            // the backing file are skipped; clusters touching data are read and sent.
            let mut data_clusters = std::collections::BTreeSet::new();
            for &(at, n, run) in &runs {
                match run {
                    Run::Backing => {}
                    Run::Zero => {
                        if !plan.zero_init {
                            if let Err(e) = img
                                .write_zeroes(at, n, true)
                                .map_err(|e| write_error(at, &crate::io::strerror(e.errno())))
                            {
                                result = Err(e);
                                break 'outer;
                            }
                        }
                    }
                    Run::Data => {
                        for c in (at - off) / cs..(at - off + n).div_ceil(cs) {
                            data_clusters.insert(c);
                        }
                    }
                }
            }
            if !data_clusters.is_empty() {
                buf.resize(len as usize, 0);
                if let Err(e) = sources.read_salvaging(off, &mut buf, plan.salvage) {
                    result = Err(e);
                    break;
                }
                for (i, cluster) in buf.chunks(cs as usize).enumerate() {
                    if !data_clusters.contains(&(i as u64)) {
                        continue;
                    }
                    let at = off + i as u64 * cs;
                    if is_zero(cluster) {
                        if !plan.zero_init {
                            if let Err(e) = img
                                .write_zeroes(at, cluster.len() as u64, true)
                                .map_err(|e| write_error(at, &crate::io::strerror(e.errno())))
                            {
                                result = Err(e);
                                break 'outer;
                            }
                        }
                        continue;
                    }
                    while next_seq - next_write >= window {
                        if let Err(e) = drain_one(&mut pending, &mut next_write, img) {
                            result = Err(e);
                            break 'outer;
                        }
                    }
                    if job_tx.send((next_seq, at, cluster.to_vec())).is_err() {
                        result = Err(CliError::new("compression worker failed"));
                        break 'outer;
                    }
                    next_seq += 1;
                    plan.throttle(next_seq * cs);
                }
            }
            off += len;
        }
        drop(job_tx);
        while result.is_ok() && next_write < next_seq {
            result = drain_one(&mut pending, &mut next_write, img);
        }
        result
    })
}
