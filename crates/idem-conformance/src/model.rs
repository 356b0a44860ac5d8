//! A property test: random sequences of operations on a few keys, with time moving in whole
//! units, applied both to the store and to a deliberately simple reference model written here
//! from the contract's table (not from `idem::transition`, so the two can disagree).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, State, Store, Token,
    WriteOutcome,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::Harness;

const KEYS: u8 = 3;

#[derive(Clone, Copy, Debug)]
enum Tok {
    /// The token of the latest claim of this key.
    Current,
    /// A token of an earlier claim of this key (or a fresh one if there is none).
    Stale(u8),
    /// A token never issued.
    Fresh,
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        k: u8,
        fp: u8,
        lease: u32,
        retention: u32,
        max: Option<u32>,
    },
    Complete {
        k: u8,
        tok: Tok,
        result: u8,
        retention: u32,
    },
    Release {
        k: u8,
        tok: Tok,
        retention: u32,
    },
    Extend {
        k: u8,
        tok: Tok,
        lease: u32,
    },
    Fail {
        k: u8,
        tok: Tok,
        retention: u32,
    },
    Evict {
        k: u8,
    },
    Get {
        k: u8,
    },
    Advance {
        units: u32,
    },
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![6 => Just(Tok::Current), 2 => (0u8..4).prop_map(Tok::Stale), 1 => Just(Tok::Fresh)]
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    prop_oneof![
        6 => (k.clone(), 0u8..2, 1u32..4, 1u32..6, proptest::option::of(1u32..4))
            .prop_map(|(k, fp, lease, retention, max)| Op::Claim { k, fp, lease, retention, max }),
        4 => (k.clone(), tok(), 0u8..3, 1u32..6)
            .prop_map(|(k, tok, result, retention)| Op::Complete { k, tok, result, retention }),
        2 => (k.clone(), tok(), 1u32..6).prop_map(|(k, tok, retention)| Op::Release { k, tok, retention }),
        2 => (k.clone(), tok(), 1u32..4).prop_map(|(k, tok, lease)| Op::Extend { k, tok, lease }),
        1 => (k.clone(), tok(), 1u32..6).prop_map(|(k, tok, retention)| Op::Fail { k, tok, retention }),
        1 => k.clone().prop_map(|k| Op::Evict { k }),
        2 => k.prop_map(|k| Op::Get { k }),
        3 => (0u32..4).prop_map(|units| Op::Advance { units }),
    ]
}

/// The reference record: times in units since the start of the case.
#[derive(Clone, Debug)]
struct MRec {
    state: State,
    fp: u8,
    token: Option<Token>,
    lease_until: u32,
    attempts: u32,
    result: Vec<u8>,
    expires_at: u32,
}

#[derive(Default)]
struct Model {
    now: u32,
    recs: HashMap<u8, MRec>,
}

/// A record as `get` shows it: state, attempts, fingerprint index, token presence, result.
type Shown = (State, u32, u8, Option<bool>, Option<Vec<u8>>);

/// What an operation returned, reduced to what the contract fixes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Acquired {
        attempt: u32,
        acquisition: Acquisition,
    },
    InProgress,
    Completed(Vec<u8>),
    Mismatch(u8),
    Exhausted(u32),
    Write(WriteOutcome),
    Evicted(bool),
    /// `get` of a live record: state, attempts, fingerprint, whether it holds a token (for the
    /// in-progress and released states only), result if completed.
    Record(Option<Shown>),
    /// The model's record is past retention: stores may or may not still hold it.
    Expired,
}

impl Model {
    fn live(&self, k: u8) -> Option<&MRec> {
        self.recs.get(&k).filter(|r| self.now < r.expires_at)
    }

    fn held(&mut self, k: u8, token: Token) -> Option<&mut MRec> {
        self.recs
            .get_mut(&k)
            .filter(|r| r.state == State::InProgress && r.token == Some(token))
    }

    fn claim(
        &mut self,
        k: u8,
        fp: u8,
        token: Token,
        lease: u32,
        retention: u32,
        max: Option<u32>,
    ) -> Seen {
        let now = self.now;
        let fresh = MRec {
            state: State::InProgress,
            fp,
            token: Some(token),
            lease_until: now + lease,
            attempts: 1,
            result: Vec::new(),
            expires_at: now + lease + retention,
        };
        let Some(r) = self.recs.get_mut(&k) else {
            self.recs.insert(k, fresh);
            return Seen::Acquired {
                attempt: 1,
                acquisition: Acquisition::New,
            };
        };
        if now >= r.expires_at {
            *r = fresh;
            return Seen::Acquired {
                attempt: 1,
                acquisition: Acquisition::Reprocess,
            };
        }
        if r.fp != fp {
            return Seen::Mismatch(r.fp);
        }
        let acquisition = match r.state {
            State::Completed => return Seen::Completed(r.result.clone()),
            State::Failed => return Seen::Exhausted(r.attempts),
            State::InProgress if now < r.lease_until => return Seen::InProgress,
            State::InProgress => Acquisition::Takeover,
            _ => Acquisition::Retry,
        };
        if max.is_some_and(|m| r.attempts >= m) {
            r.state = State::Failed;
            r.expires_at = now + retention;
            return Seen::Exhausted(r.attempts);
        }
        r.state = State::InProgress;
        r.token = Some(token);
        r.lease_until = now + lease;
        r.attempts += 1;
        r.expires_at = now + lease + retention;
        Seen::Acquired {
            attempt: r.attempts,
            acquisition,
        }
    }

    fn complete(&mut self, k: u8, token: Token, result: &[u8], retention: u32) -> Seen {
        let now = self.now;
        if let Some(r) = self.held(k, token) {
            r.state = State::Completed;
            r.result = result.to_vec();
            r.expires_at = now + retention;
            return Seen::Write(WriteOutcome::Applied);
        }
        self.repeated(k, State::Completed, token)
    }

    fn repeated(&self, k: u8, state: State, token: Token) -> Seen {
        let same = self
            .recs
            .get(&k)
            .is_some_and(|r| r.state == state && r.token == Some(token));
        Seen::Write(if same {
            WriteOutcome::Applied
        } else {
            WriteOutcome::LeaseLost
        })
    }

    fn release(&mut self, k: u8, token: Token, retention: u32) -> Seen {
        let now = self.now;
        let Some(r) = self.held(k, token) else {
            return Seen::Write(WriteOutcome::LeaseLost);
        };
        r.state = State::Released;
        r.token = None;
        r.expires_at = now + retention;
        Seen::Write(WriteOutcome::Applied)
    }

    fn extend(&mut self, k: u8, token: Token, lease: u32) -> Seen {
        let now = self.now;
        let Some(r) = self.held(k, token) else {
            return Seen::Write(WriteOutcome::LeaseLost);
        };
        let keep = r.expires_at.saturating_sub(r.lease_until);
        r.lease_until = now + lease;
        r.expires_at = r.lease_until + keep;
        Seen::Write(WriteOutcome::Applied)
    }

    fn fail(&mut self, k: u8, token: Token, retention: u32) -> Seen {
        let now = self.now;
        if let Some(r) = self.held(k, token) {
            r.state = State::Failed;
            r.result = b"reason".to_vec();
            r.expires_at = now + retention;
            return Seen::Write(WriteOutcome::Applied);
        }
        self.repeated(k, State::Failed, token)
    }

    fn get(&self, k: u8) -> Seen {
        match (self.recs.get(&k), self.live(k)) {
            (Some(_), None) => Seen::Expired,
            (_, r) => Seen::Record(r.map(|r| {
                let result = (r.state == State::Completed).then(|| r.result.clone());
                (
                    r.state,
                    r.attempts,
                    r.fp,
                    token_shown(r.state, r.token),
                    result,
                )
            })),
        }
    }
}

/// Token presence is fixed by the contract only while in progress (the owner's) and once
/// released (none).
fn token_shown(state: State, token: Option<Token>) -> Option<bool> {
    matches!(state, State::InProgress | State::Released).then_some(token.is_some())
}

fn payload(fp: u8) -> Vec<u8> {
    format!("payload-{fp}").into_bytes()
}

async fn run_case<H: Harness>(h: &H, ops: &[Op]) -> Result<(), TestCaseError> {
    let s = h.store();
    let ns: Namespace = h.namespace();
    let unit = h.unit();
    let keys: Vec<Key> = (0..KEYS)
        .map(|i| ns.key(format!("k{i}")).expect("valid key"))
        .collect();
    let fps: Vec<Fingerprint> = (0..2).map(|fp| Fingerprint::of(&payload(fp))).collect();
    let mut model = Model::default();
    // Every token issued per key, the latest last.
    let mut issued: HashMap<u8, Vec<Token>> = HashMap::new();
    let pick = |issued: &HashMap<u8, Vec<Token>>, k: u8, tok: Tok| -> Token {
        let list = issued.get(&k).map(Vec::as_slice).unwrap_or(&[]);
        match tok {
            Tok::Current => list.last().copied().unwrap_or_else(Token::random),
            Tok::Stale(i) if !list.is_empty() => list[usize::from(i) % list.len()],
            _ => Token::random(),
        }
    };
    let units = |n: u32| unit * n;
    let err = |e: idem::StoreError| TestCaseError::fail(format!("store error: {e}"));
    // On a real clock each step happens a little after the model's time: the round trips so far
    // add up. While that lag stays under a unit, every comparison of two times in the case
    // (whole units apart) comes out as in the model; a case that lagged further proves nothing.
    let started = std::time::Instant::now();

    for (step, op) in ops.iter().enumerate() {
        let (expected, got) = match op.clone() {
            Op::Claim {
                k,
                fp,
                lease,
                retention,
                max,
            } => {
                let req = ClaimRequest::new(keys[k as usize].clone(), fps[fp as usize])
                    .lease(units(lease))
                    .retention(units(retention))
                    .max_attempts(max.and_then(NonZeroU32::new));
                issued.entry(k).or_default().push(req.token);
                let expected = model.claim(k, fp, req.token, lease, retention, max);
                let got = match s.claim(&req).await.map_err(err)? {
                    Claim::Acquired(l) => Seen::Acquired {
                        attempt: l.attempt,
                        acquisition: l.acquisition,
                    },
                    Claim::InProgress { .. } => Seen::InProgress,
                    Claim::Completed { result } => Seen::Completed(result.to_vec()),
                    Claim::Mismatch { stored } => {
                        Seen::Mismatch(fps.iter().position(|f| *f == stored).map_or(9, |i| i as u8))
                    }
                    Claim::Exhausted { attempts, .. } => Seen::Exhausted(attempts),
                    other => return Err(TestCaseError::fail(format!("unknown claim {other:?}"))),
                };
                (expected, got)
            }
            Op::Complete {
                k,
                tok,
                result,
                retention,
            } => {
                let token = pick(&issued, k, tok);
                let bytes = vec![b'r', result];
                let expected = model.complete(k, token, &bytes, retention);
                let c = Completion::new(keys[k as usize].clone(), token, Bytes::from(bytes))
                    .retention(units(retention));
                (expected, Seen::Write(s.complete(&c).await.map_err(err)?))
            }
            Op::Release { k, tok, retention } => {
                let token = pick(&issued, k, tok);
                let expected = model.release(k, token, retention);
                let got = s.release(&keys[k as usize], token, units(retention)).await;
                (expected, Seen::Write(got.map_err(err)?))
            }
            Op::Extend { k, tok, lease } => {
                let token = pick(&issued, k, tok);
                let expected = model.extend(k, token, lease);
                let got = s.extend(&keys[k as usize], token, units(lease)).await;
                (expected, Seen::Write(got.map_err(err)?))
            }
            Op::Fail { k, tok, retention } => {
                let token = pick(&issued, k, tok);
                let expected = model.fail(k, token, retention);
                let got = s
                    .fail(&keys[k as usize], token, "reason", units(retention))
                    .await;
                (expected, Seen::Write(got.map_err(err)?))
            }
            Op::Evict { k } => {
                let existed = s.evict(&keys[k as usize]).await.map_err(err)?;
                let expired = model.recs.contains_key(&k) && model.live(k).is_none();
                let expected = model.recs.remove(&k).is_some();
                // A store with native expiry may have dropped an expired record already.
                let expected = if expired { existed } else { expected };
                (Seen::Evicted(expected), Seen::Evicted(existed))
            }
            Op::Get { k } => {
                let expected = model.get(k);
                let rec = s.get(&keys[k as usize]).await.map_err(err)?;
                let got = if expected == Seen::Expired {
                    Seen::Expired
                } else {
                    Seen::Record(rec.map(|r| {
                        let fp = fps
                            .iter()
                            .position(|f| *f == r.fingerprint)
                            .map_or(9, |i| i as u8);
                        let result = (r.state == State::Completed)
                            .then(|| r.result.map(|b| b.to_vec()).unwrap_or_default());
                        (
                            r.state,
                            r.attempts,
                            fp,
                            token_shown(r.state, r.token),
                            result,
                        )
                    }))
                };
                (expected, got)
            }
            Op::Advance { units: n } => {
                model.now += n;
                h.advance(units(n)).await;
                continue;
            }
        };
        if expected != got {
            let lag = started.elapsed().saturating_sub(units(model.now));
            // A few milliseconds for stores that keep time in whole milliseconds.
            if lag + Duration::from_millis(5) >= unit {
                return Err(TestCaseError::reject(format!(
                    "step {step} ran {lag:?} after the model's time, over a unit ({unit:?})"
                )));
            }
            return Err(TestCaseError::fail(format!(
                "step {step} ({op:?}) at t={}: model says {expected:?}, store says {got:?}\nops: {ops:#?}",
                model.now
            )));
        }
    }
    Ok(())
}

/// Random operation sequences on three keys, with time moving in whole units, must give the
/// same answers from the store as from a reference model of the contract.
pub async fn random_operation_sequences_match_the_model<H: Harness>(h: &H) {
    let cases = h.property_cases();
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: if cases > 32 { 2048 } else { 64 },
            // Cases a loaded machine ran too slowly to judge are run again with other
            // sequences; a machine that keeps failing to keep time fails the check.
            max_global_rejects: cases,
            ..Config::default()
        });
        runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
            handle.block_on(run_case(h, &ops))
        })
    });
    if let Err(e) = result {
        panic!("the store disagrees with the reference model: {e}");
    }
}
