//! `retry` in paused time, with a made-up client's errors: when it stops (an answer, a
//! refusal, the attempt limit, the deadline, an interrupt), which attempts it cuts, and how far
//! a policy's overtime takes it.

use super::*;

#[tokio::test]
async fn no_wait_when_the_deadline_leaves_no_room() {
    let mut memory = backoff::Memory::default();
    let soon = Instant::now() + RETRY_SLACK / 2;
    assert_eq!(wait_before_retry(1, None, &mut memory, soon), None);
    let later = Instant::now() + Duration::from_secs(600);
    let wait = wait_before_retry(1, None, &mut memory, later).expect("room for a wait");
    assert!(wait < Duration::from_secs(600));
}

/// An error of a made-up client: retryable or not, and what the loop made of it.
#[derive(Debug, PartialEq)]
enum Fake {
    Busy,
    Refused,
    NoAnswer,
    GaveUp(u32, Box<Fake>),
}

impl std::fmt::Display for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Retryable for Fake {
    fn is_retryable(&self) -> bool {
        matches!(self, Fake::Busy | Fake::NoAnswer)
    }
    fn retry_hint(&self) -> Option<&backoff::Hint> {
        None
    }
}

impl RetryError for Fake {
    fn gave_up(attempts: u32, _seconds: u64, last: Self) -> Self {
        Fake::GaveUp(attempts, Box::new(last))
    }
}

#[tokio::test(start_paused = true)]
async fn retries_until_an_answer_and_stops_at_a_refusal() {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut tries = 0;
    let answer: Result<u32, Fake> = retry_until(
        deadline,
        50,
        || {
            tries += 1;
            let now = tries;
            async move { if now < 3 { Err(Fake::Busy) } else { Ok(now) } }
        },
        || Fake::NoAnswer,
    )
    .await;
    assert_eq!(answer, Ok(3));

    let mut tries = 0;
    let refused: Result<(), Fake> = retry_until(
        deadline,
        50,
        || {
            tries += 1;
            async { Err(Fake::Refused) }
        },
        || Fake::NoAnswer,
    )
    .await;
    assert_eq!(refused, Err(Fake::Refused));
    assert_eq!(tries, 1, "a refusal is not tried again");
}

#[tokio::test(start_paused = true)]
async fn gives_up_at_the_attempt_limit_or_the_deadline() {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let limited: Result<(), Fake> =
        retry_until(deadline, 4, || async { Err(Fake::Busy) }, || Fake::NoAnswer).await;
    assert_eq!(limited, Err(Fake::GaveUp(4, Box::new(Fake::Busy))));

    // An attempt that never answers is cut at the deadline, and nothing is tried after it.
    let soon = Instant::now() + Duration::from_secs(5);
    let stalled: Result<(), Fake> =
        retry_until(soon, 50, std::future::pending::<Result<(), Fake>>, || {
            Fake::NoAnswer
        })
        .await;
    assert_eq!(stalled, Err(Fake::GaveUp(1, Box::new(Fake::NoAnswer))));
    assert!(Instant::now() <= soon + Duration::from_millis(1));
}

/// The kind of a made-up client's attempt: whether the loop may cut it.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Cuttable,
    MustNotBeCut,
}

/// A made-up client's policy: it names its call, never cuts a `MustNotBeCut` attempt, and lets
/// `Busy` answers go on past the deadline when it has an `overtime`.
struct Rules {
    overtime: Option<Duration>,
}

impl Policy<Kind, Fake> for Rules {
    fn what(&self) -> Option<&str> {
        Some("fake call")
    }
    fn may_cut(&self, kind: Kind) -> bool {
        matches!(kind, Kind::Cuttable)
    }
    fn overtime(&self, _kind: Kind, error: &Fake) -> Option<Overtime> {
        let up_to = self.overtime.filter(|_| *error == Fake::Busy)?;
        Some(Overtime {
            up_to,
            who: "a fake call",
        })
    }
}

const NO_OVERTIME: Rules = Rules { overtime: None };

fn after(seconds: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_secs(seconds))
}

#[tokio::test(start_paused = true)]
async fn an_interrupt_ends_the_call_before_an_attempt_in_a_wait_and_in_a_cuttable_attempt() {
    let far = Instant::now() + Duration::from_secs(3600);
    let busy = || (Kind::Cuttable, async { Err::<(), _>(Fake::Busy) });

    // Already asked to stop: no attempt at all.
    let mut tries = 0;
    let before: Result<(), _> = retry(
        far,
        50,
        &NO_OVERTIME,
        std::future::ready(()),
        || {
            tries += 1;
            busy()
        },
        || Fake::NoAnswer,
    )
    .await;
    assert!(matches!(before, Err(Stopped::Interrupted { attempts: 0 })));
    assert_eq!(tries, 0);

    // Asked during the wait after a failed attempt (every wait is at least a second): the wait
    // ends at once and no attempt follows.
    let started = Instant::now();
    let mut tries = 0;
    let waiting = retry(
        far,
        50,
        &NO_OVERTIME,
        tokio::time::sleep(Duration::from_millis(500)),
        || {
            tries += 1;
            busy()
        },
        || Fake::NoAnswer,
    )
    .await;
    assert!(matches!(waiting, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(tries, 1);
    assert_eq!(started.elapsed(), Duration::from_millis(500));

    // Asked while a cuttable attempt hangs: it is dropped then.
    let started = Instant::now();
    let hanging: Result<(), _> = retry(
        far,
        50,
        &NO_OVERTIME,
        after(5),
        || (Kind::Cuttable, std::future::pending()),
        || Fake::NoAnswer,
    )
    .await;
    assert!(matches!(hanging, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

/// GitLab's runner creation: its answer is the only way to learn the token of what it created.
#[tokio::test(start_paused = true)]
async fn an_attempt_that_must_not_be_cut_outlasts_the_deadline_and_the_interrupt() {
    // Deadline at 10 s, interrupt at 5 s, answer at 25 s: the answer ends the call.
    let started = Instant::now();
    let answered = retry(
        started + Duration::from_secs(10),
        50,
        &NO_OVERTIME,
        after(5),
        || {
            (Kind::MustNotBeCut, async {
                after(25).await;
                Ok::<_, Fake>(7)
            })
        },
        || Fake::NoAnswer,
    )
    .await;
    assert!(matches!(answered, Ok(7)), "{answered:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(25));

    // A failure that may be retried: the interrupt ends the call after it, with no attempt more.
    let started = Instant::now();
    let mut tries = 0;
    let failed: Result<(), _> = retry(
        started + Duration::from_secs(3600),
        50,
        &NO_OVERTIME,
        after(5),
        || {
            tries += 1;
            (Kind::MustNotBeCut, async {
                after(25).await;
                Err(Fake::Busy)
            })
        },
        || Fake::NoAnswer,
    )
    .await;
    assert!(matches!(failed, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(tries, 1);
    assert_eq!(started.elapsed(), Duration::from_secs(25));
}

/// GitLab's throttled deletion: `Busy` rides past the deadline up to the overtime, an attempt
/// in that time is cut at the overtime's end, and any other error past the deadline ends it.
#[tokio::test(start_paused = true)]
async fn overtime_goes_past_the_deadline_for_its_errors_only_and_up_to_its_limit() {
    let rules = Rules {
        overtime: Some(Duration::from_secs(120)),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);

    let mut tries = 0;
    let busy: Result<(), _> = retry(
        deadline,
        1000,
        &rules,
        std::future::pending(),
        || {
            tries += 1;
            (Kind::Cuttable, async { Err(Fake::Busy) })
        },
        || Fake::NoAnswer,
    )
    .await;
    let Err(Stopped::DeadlineExceeded { last, attempts, .. }) = busy else {
        panic!("{busy:?}")
    };
    assert_eq!((last, attempts), (Fake::Busy, tries));
    let elapsed = started.elapsed();
    assert!(
        elapsed > Duration::from_secs(100) && elapsed <= Duration::from_secs(120),
        "{elapsed:?}"
    );

    // Past the deadline an attempt that hangs is cut at the overtime's end, not at once.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let hangs_later: Result<(), _> = retry(
        deadline,
        1000,
        &rules,
        std::future::pending(),
        || {
            let late = Instant::now() >= deadline;
            let answer = async move {
                if late {
                    std::future::pending::<()>().await;
                }
                Err(Fake::Busy)
            };
            (Kind::Cuttable, answer)
        },
        || Fake::NoAnswer,
    )
    .await;
    assert!(
        matches!(
            hangs_later,
            Err(Stopped::DeadlineExceeded {
                last: Fake::NoAnswer,
                ..
            })
        ),
        "{hangs_later:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(120));

    // Another error past the deadline: no more attempts.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let mut tries = 0;
    let other: Result<(), _> = retry(
        deadline,
        1000,
        &rules,
        std::future::pending(),
        || {
            tries += 1;
            let answer = if Instant::now() < deadline + Duration::from_secs(5) {
                Fake::Busy
            } else {
                Fake::NoAnswer
            };
            (Kind::Cuttable, async { Err(answer) })
        },
        || Fake::NoAnswer,
    )
    .await;
    let Err(Stopped::DeadlineExceeded { last, attempts, .. }) = other else {
        panic!("{other:?}")
    };
    assert_eq!((last, attempts), (Fake::NoAnswer, tries));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(15) && elapsed < Duration::from_secs(30),
        "{elapsed:?}"
    );
}

#[test]
fn the_log_line_names_the_call_and_a_wait_past_the_deadline() {
    let wait = Duration::from_millis(1500);
    assert_eq!(
        retry_line(None, &Fake::Busy, 1, wait, None),
        "Busy; retry 1 in 1.5 s"
    );
    let overtime = Overtime {
        up_to: Duration::from_secs(600),
        who: "a throttled deletion",
    };
    assert_eq!(
        retry_line(Some("deregister"), &Fake::Busy, 3, wait, Some(&overtime)),
        "deregister: Busy; retry 3 in 1.5 s \
         (past the deadline: a throttled deletion keeps trying for up to 600 s)"
    );
}

/// The metadata service's and the broker's calls: every attempt cut at the deadline, nothing
/// past it, the error alone in the log line.
#[test]
fn the_plain_policy_cuts_every_attempt_and_grants_no_overtime() {
    let plain: &dyn Policy<(), Fake> = &Plain;
    assert_eq!(plain.what(), None);
    assert!(plain.may_cut(()));
    assert!(plain.overtime((), &Fake::Busy).is_none());
}
