//! `retry` in paused time, with a made-up client's errors: when it stops (an answer, a
//! refusal, the attempt limit, the deadline, an interrupt), which attempts it cuts, and how far
//! a policy's overtime takes it.

use std::future::Future;

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
#[derive(Debug, Clone, PartialEq)]
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

/// `retry` of a made-up call: at most 1,000 attempts, `Fake::NoAnswer` when one is cut.
async fn fake_call<T, Fut>(
    deadline: Instant,
    rules: &Rules,
    give_up: impl Future<Output = ()>,
    attempt_once: impl FnMut() -> (Kind, Fut),
) -> Result<T, Stopped<Fake>>
where
    Fut: Future<Output = Result<T, Fake>>,
{
    retry(deadline, 1000, rules, give_up, attempt_once, || {
        Fake::NoAnswer
    })
    .await
}

/// The last error and the number of attempts of a call that gave up.
fn gave_up<T: std::fmt::Debug>(result: Result<T, Stopped<Fake>>) -> (Fake, u32) {
    match result {
        Err(Stopped::DeadlineExceeded { last, attempts, .. }) => (last, attempts),
        other => panic!("{other:?}"),
    }
}

fn after(seconds: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_secs(seconds))
}

#[tokio::test(start_paused = true)]
async fn an_interrupt_ends_the_call_before_an_attempt_in_a_wait_and_in_a_cuttable_attempt() {
    let far = Instant::now() + Duration::from_secs(3600);
    let mut tries = 0;
    let mut busy = || {
        tries += 1;
        (Kind::Cuttable, async { Err::<(), _>(Fake::Busy) })
    };

    // Already asked to stop: no attempt at all.
    let before = fake_call(far, &NO_OVERTIME, std::future::ready(()), &mut busy).await;
    assert!(matches!(before, Err(Stopped::Interrupted { attempts: 0 })));

    // Asked during the wait after a failed attempt (every wait is at least a second): the wait
    // ends at once and no attempt follows.
    let started = Instant::now();
    let half_a_second = tokio::time::sleep(Duration::from_millis(500));
    let waiting = fake_call(far, &NO_OVERTIME, half_a_second, &mut busy).await;
    assert!(matches!(waiting, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(tries, 1);
    assert_eq!(started.elapsed(), Duration::from_millis(500));

    // Asked while a cuttable attempt hangs: it is dropped then.
    let started = Instant::now();
    let hangs = || (Kind::Cuttable, std::future::pending::<Result<(), _>>());
    let hanging = fake_call(far, &NO_OVERTIME, after(5), hangs).await;
    assert!(matches!(hanging, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

/// GitLab's runner creation: its answer is the only way to learn the token of what it created.
#[tokio::test(start_paused = true)]
async fn an_attempt_that_must_not_be_cut_outlasts_the_deadline_and_the_interrupt() {
    // Deadline at 10 s, interrupt at 5 s, answer at 25 s: the answer ends the call.
    let started = Instant::now();
    let slow = |answer: fn() -> Result<u32, Fake>| {
        move || {
            (Kind::MustNotBeCut, async move {
                after(25).await;
                answer()
            })
        }
    };
    let deadline = started + Duration::from_secs(10);
    let answered = fake_call(deadline, &NO_OVERTIME, after(5), slow(|| Ok(7))).await;
    assert!(matches!(answered, Ok(7)), "{answered:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(25));

    // A failure that may be retried: the interrupt ends the call after it, with no attempt more.
    let started = Instant::now();
    let far = started + Duration::from_secs(3600);
    let failed = fake_call(far, &NO_OVERTIME, after(5), slow(|| Err(Fake::Busy))).await;
    assert!(matches!(failed, Err(Stopped::Interrupted { attempts: 1 })));
    assert_eq!(started.elapsed(), Duration::from_secs(25));
}

/// Attempts that answer `Busy` until `busy_for` seconds have passed, then `later` (None: no
/// answer at all).
fn busy_then(busy_for: u64, later: Option<Fake>) -> impl FnMut() -> (Kind, Answer) {
    let until = Instant::now() + Duration::from_secs(busy_for);
    move || {
        let answer: Answer = match &later {
            _ if Instant::now() < until => Box::pin(std::future::ready(Err(Fake::Busy))),
            Some(error) => Box::pin(std::future::ready(Err(error.clone()))),
            None => Box::pin(std::future::pending()),
        };
        (Kind::Cuttable, answer)
    }
}

type Answer = std::pin::Pin<Box<dyn Future<Output = Result<(), Fake>>>>;

/// GitLab's throttled deletion: `Busy` rides past the deadline (10 s) up to the overtime
/// (120 s), an attempt in that time is cut at the overtime's end, and any other error past the
/// deadline ends the call.
#[tokio::test(start_paused = true)]
async fn overtime_goes_past_the_deadline_for_its_errors_only_and_up_to_its_limit() {
    let rules = Rules {
        overtime: Some(Duration::from_secs(120)),
    };
    let never = std::future::pending::<()>;
    let deadline = || Instant::now() + Duration::from_secs(10);

    let started = Instant::now();
    let busy = fake_call(deadline(), &rules, never(), busy_then(3600, None)).await;
    assert_eq!(gave_up(busy).0, Fake::Busy);
    let elapsed = started.elapsed();
    assert!(
        elapsed > Duration::from_secs(100) && elapsed <= Duration::from_secs(120),
        "{elapsed:?}"
    );

    let started = Instant::now();
    let hangs_later = fake_call(deadline(), &rules, never(), busy_then(15, None)).await;
    assert_eq!(gave_up(hangs_later).0, Fake::NoAnswer);
    assert_eq!(started.elapsed(), Duration::from_secs(120));

    let started = Instant::now();
    let other_later = busy_then(15, Some(Fake::NoAnswer));
    let other = fake_call(deadline(), &rules, never(), other_later).await;
    assert_eq!(gave_up(other).0, Fake::NoAnswer);
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
