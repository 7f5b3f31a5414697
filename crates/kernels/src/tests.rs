//! The kernels' tests (moved here from Candor's candle tests, so that they run with this
//! crate's optimisation level and in its own test binary).

use crate::pool;
use crate::quant::{QMatrix, supported};
use candle_core::quantized::{GgmlDType, QTensor};
use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn q4_1_and_q8_0_matmuls_match_dequantized_f32_within_activation_rounding() {
    if !supported() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    let dev = candle_core::Device::Cpu;
    let (n, k) = (70, 96);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
    let w = candle_core::Tensor::from_vec(w, (n, k), &dev).unwrap();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let mat = QMatrix::from_qtensor(&q).unwrap();
        let wd = q.dequantize(&dev).unwrap();
        let mut row = vec![0f32; k];
        mat.dequantize_row(3, &mut row);
        assert_eq!(row, wd.get(3).unwrap().to_vec1::<f32>().unwrap());
        for m in [1, 3, 5, 70] {
            let x: Vec<f32> = (0..m * k).map(|i| (i * 13 % 29) as f32 / 14.0 - 1.0).collect();
            let x = candle_core::Tensor::from_vec(x, (m, k), &dev).unwrap();
            let got = mat.forward(&x).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let err = (got.clone() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 0.02 * scale, "{dtype:?} m {m}: error {err} of {scale}");
            // Each row alone gives the same bits as in the batch.
            for r in 0..m {
                let alone = mat.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
                assert_eq!(
                    alone.get(0).unwrap().to_vec1::<f32>().unwrap(),
                    got.get(r).unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
    }
}

#[test]
fn a_cpu_without_the_kernels_features_is_refused_at_construction() {
    let w = candle_core::Tensor::zeros((2, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let err = QMatrix::from_qtensor_on(&q, false).expect_err("no QMatrix without AVX2, FMA and F16C");
        assert!(err.to_string().contains("AVX2, FMA and F16C"), "{err}");
        // The public constructor asks the CPU.
        assert_eq!(QMatrix::from_qtensor(&q).is_ok(), supported());
    }
}

#[test]
fn every_item_runs_once_whoever_calls() {
    let callers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for n in [0, 1, 7, 100, 1000 + t] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    pool::run(n, |r| {
                        for i in r {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                            // Nested calls run inline.
                            pool::run(2, |_| {});
                        }
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            })
        })
        .collect();
    callers.into_iter().for_each(|c| c.join().unwrap());
}

/// Runs `body` on a thread of its own and fails if it panics or has not finished after `secs`
/// seconds (a hang: the stuck thread is left behind).
fn bounded(secs: u64, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(body)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(())) => {}
        Ok(Err(payload)) => panic::resume_unwind(payload),
        Err(_) => panic!("hung: not done after {secs} s"),
    }
}

/// Waits until `cond` holds, for at most 20 s; whether it does.
fn wait_for(cond: impl Fn() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn is_helper() -> bool {
    std::thread::current().name() == Some(pool::HELPER_NAME)
}

fn message(payload: &(dyn Any + Send)) -> &str {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(not a string)",
    }
}

/// Counts a thread out of the closure even when it unwinds.
struct Leave<'a>(&'a AtomicUsize);
impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The pool still has all its threads and runs jobs right: a job whose items each wait until
/// every thread of the pool has entered one, then an ordinary job, each item exactly once.
fn pool_is_whole() {
    let threads = pool::threads();
    let entered = AtomicUsize::new(0);
    let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
    // `threads` items make chunks of one item.
    pool::run(threads, |r| {
        for i in r {
            entered.fetch_add(1, Ordering::SeqCst);
            assert!(wait_for(|| entered.load(Ordering::SeqCst) >= threads), "not all {threads} pool threads joined");
            hits[i].fetch_add(1, Ordering::Relaxed);
        }
    });
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
    pool::run(hits.len(), |r| r.for_each(|i| _ = hits[i].fetch_add(1, Ordering::Relaxed)));
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
}

#[test]
fn a_panic_on_a_helper_reaches_the_caller_and_the_pool_goes_on() {
    bounded(30, || {
        let panicked = AtomicBool::new(false);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool::run(64, |_| {
                if is_helper() {
                    if !panicked.swap(true, Ordering::SeqCst) {
                        panic!("helper boom");
                    }
                } else {
                    // The caller holds on to its first chunk until a helper has panicked.
                    assert!(wait_for(|| panicked.load(Ordering::SeqCst)), "no helper joined");
                }
            })
        }));
        let payload = result.expect_err("the helper's panic reaches the caller");
        assert_eq!(message(&*payload), "helper boom");
        pool_is_whole();
    });
}

#[test]
fn a_panic_on_the_caller_waits_for_the_helpers_inside_and_reaches_the_caller() {
    bounded(30, || {
        let (caller_in, helper_in) = (AtomicBool::new(false), AtomicBool::new(false));
        let inside = AtomicUsize::new(0);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool::run(64, |_| {
                inside.fetch_add(1, Ordering::SeqCst);
                let _leave = Leave(&inside);
                if is_helper() {
                    // No chunk ends before the caller has one of its own.
                    assert!(wait_for(|| caller_in.load(Ordering::SeqCst)), "the caller took no chunk");
                    if !helper_in.swap(true, Ordering::SeqCst) {
                        // Still inside the closure well after the caller has panicked.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                } else {
                    caller_in.store(true, Ordering::SeqCst);
                    assert!(wait_for(|| helper_in.load(Ordering::SeqCst)), "no helper joined");
                    panic!("caller boom");
                }
            })
        }));
        assert_eq!(inside.load(Ordering::SeqCst), 0, "a helper is inside the closure after `run` unwound");
        let payload = result.expect_err("the caller's panic propagates");
        assert_eq!(message(&*payload), "caller boom");
        pool_is_whole();
    });
}

#[test]
fn panicking_runs_from_concurrent_callers_leave_the_pool_whole() {
    bounded(120, || {
        let callers: Vec<_> = (0..4usize)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..60usize {
                        let n = 50 + (i * 7 + t) % 200;
                        let bad = (i * 13 + t) % n;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        let helper_ran = AtomicBool::new(false);
                        let result = panic::catch_unwind(AssertUnwindSafe(|| {
                            pool::run(n, |r| {
                                for j in r {
                                    match i % 3 {
                                        // One item panics, on whichever thread runs it.
                                        1 if j == bad => panic!("item {j} of caller {t}, run {i}"),
                                        // Every item a helper runs panics.
                                        2 if is_helper() => {
                                            helper_ran.store(true, Ordering::SeqCst);
                                            panic!("helper in caller {t}, run {i}")
                                        }
                                        _ => {}
                                    }
                                    // A few microseconds of work, so that helpers join.
                                    (0..10_000).for_each(|x| _ = std::hint::black_box(x));
                                    hits[j].fetch_add(1, Ordering::Relaxed);
                                }
                            })
                        }));
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) <= 1));
                        match i % 3 {
                            0 => {
                                assert!(result.is_ok());
                                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                            }
                            1 => {
                                let payload = result.expect_err("the item's panic propagates");
                                assert_eq!(message(&*payload), format!("item {bad} of caller {t}, run {i}"));
                            }
                            _ => match result {
                                Err(payload) => {
                                    assert!(helper_ran.load(Ordering::SeqCst));
                                    assert_eq!(message(&*payload), format!("helper in caller {t}, run {i}"));
                                }
                                Ok(()) => assert!(!helper_ran.load(Ordering::SeqCst)),
                            },
                        }
                    }
                    // Jobs from this thread still run on the whole pool (not inline).
                    pool_is_whole();
                })
            })
            .collect();
        callers.into_iter().for_each(|c| c.join().unwrap());
        pool_is_whole();
    });
}
