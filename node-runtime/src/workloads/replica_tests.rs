//! The replica state machine on plain data: no clock, no kernel, no disk.

use super::*;

fn ident(pid: i32) -> ProcIdentity {
    ProcIdentity {
        pid,
        boot_id: "b".into(),
        start_ticks: 1,
    }
}

fn policy(restart: RestartPolicy) -> Policy {
    Policy {
        restart,
        backoff_base: Duration::from_secs(10),
        backoff_max: Duration::from_secs(300),
        backoff_reset_after: Duration::from_secs(600),
        has_probe: false,
        success_threshold: 1,
        failure_threshold: 3,
        image: "img".into(),
    }
}

/// Drive a replica from Idle to Running; returns the token of the running container.
fn run(r: &mut Replica, p: &Policy, now: u64, id: &str) -> u64 {
    let a = r.handle(Event::Start, now, p);
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!("{a:?}")
    };
    let a = r.handle(
        Event::ImageReady {
            token,
            container_id: id.into(),
        },
        now,
        p,
    );
    assert!(matches!(
        a.as_slice(),
        [Action::Persist, Action::CreateContainer { .. }]
    ));
    let token = r.token;
    let a = r.handle(
        Event::Started {
            token,
            identity: ident(42),
        },
        now,
        p,
    );
    assert!(a.contains(&Action::WatchExit {
        token: r.token,
        container_id: id.into()
    }));
    assert_eq!(r.phase, Phase::Running);
    r.token
}

fn timer_of(a: &[Action]) -> (u64, Duration) {
    a.iter()
        .find_map(|a| match a {
            Action::Schedule { token, after } => Some((*token, *after)),
            _ => None,
        })
        .expect("a timer")
}

fn prepare_token(a: &[Action]) -> u64 {
    a.iter()
        .find_map(|a| match a {
            Action::PrepareImage { token } => Some(*token),
            _ => None,
        })
        .expect("an image preparation")
}

#[test]
fn crash_loop_backs_off_exponentially_and_caps() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    let mut now = 1_000_000;
    let mut delays = Vec::new();
    let mut a = r.handle(Event::Start, now, &p);
    for i in 0..8 {
        let token = prepare_token(&a);
        r.handle(
            Event::ImageReady {
                token,
                container_id: format!("c{i}"),
            },
            now,
            &p,
        );
        r.handle(
            Event::Started {
                token: r.token,
                identity: ident(10 + i),
            },
            now,
            &p,
        );
        assert_eq!(r.container_id(), Some(format!("c{i}").as_str()));
        now += 1000;
        let exit = r.handle(
            Event::Exited {
                token: r.token,
                code: Some(1),
                oom: false,
            },
            now,
            &p,
        );
        assert_eq!(r.reason, Some(Reason::CrashLoopBackOff));
        assert_eq!(r.phase, Phase::Running);
        assert_eq!(r.last_exit_code, Some(1));
        assert_eq!(r.container_id(), None);
        let (token, after) = timer_of(&exit);
        delays.push(after.as_secs());
        now += after.as_millis() as u64;
        a = r.handle(Event::TimerFired { token }, now, &p);
        assert_eq!(r.stage, Stage::Preparing);
    }
    assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(r.restarts, 8);
}

#[test]
fn a_long_run_resets_the_backoff() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    r.failures = 5;
    let t = run(&mut r, &p, 0, "c");
    let a = r.handle(
        Event::Exited {
            token: t,
            code: Some(2),
            oom: false,
        },
        601_000,
        &p,
    );
    assert_eq!(timer_of(&a).1, Duration::from_secs(10));
}

#[test]
fn restart_policies_decide_finish() {
    for (policy_kind, code, phase, reason) in [
        (
            RestartPolicy::Never,
            Some(0),
            Phase::Succeeded,
            Reason::Completed,
        ),
        (RestartPolicy::Never, Some(3), Phase::Failed, Reason::Error),
        (
            RestartPolicy::OnFailure,
            Some(0),
            Phase::Succeeded,
            Reason::Completed,
        ),
        (RestartPolicy::Never, None, Phase::Failed, Reason::Unknown),
    ] {
        let p = policy(policy_kind);
        let mut r = Replica::new(0);
        let t = run(&mut r, &p, 0, "c");
        let a = r.handle(
            Event::Exited {
                token: t,
                code,
                oom: false,
            },
            5,
            &p,
        );
        assert_eq!(
            (r.phase, r.reason.clone()),
            (phase, Some(reason)),
            "{policy_kind:?} {code:?}"
        );
        assert_eq!(r.stage, Stage::Finished);
        assert!(!a.iter().any(|a| matches!(a, Action::Schedule { .. })));
        // A finished replica ignores timers and starts.
        assert!(r
            .handle(Event::TimerFired { token: r.token }, 6, &p)
            .is_empty());
    }
    // OnFailure restarts a failure.
    let p = policy(RestartPolicy::OnFailure);
    let mut r = Replica::new(0);
    let t = run(&mut r, &p, 0, "c");
    r.handle(
        Event::Exited {
            token: t,
            code: Some(1),
            oom: false,
        },
        5,
        &p,
    );
    assert!(matches!(r.stage, Stage::BackOff { .. }));
}

#[test]
fn oom_is_reported_as_oomkilled() {
    let p = policy(RestartPolicy::Never);
    let mut r = Replica::new(0);
    let t = run(&mut r, &p, 0, "c");
    r.handle(
        Event::Exited {
            token: t,
            code: Some(137),
            oom: true,
        },
        5,
        &p,
    );
    assert_eq!(
        (r.phase, r.reason.clone()),
        (Phase::Failed, Some(Reason::OomKilled))
    );
    assert_eq!(r.last_exit_code, Some(137));
}

#[test]
fn image_failures_turn_into_backoff_reasons() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    let a = r.handle(Event::Start, 0, &p);
    assert_eq!(r.reason, Some(Reason::ContainerCreating));
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!()
    };
    let a = r.handle(
        Event::ImageFailed {
            token,
            kind: ImageFailure::Pull,
            message: "down".into(),
        },
        0,
        &p,
    );
    assert_eq!(r.reason, Some(Reason::ErrImagePull));
    let (token, _) = timer_of(&a);
    let a = r.handle(Event::TimerFired { token }, 10_000, &p);
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!()
    };
    r.handle(
        Event::ImageFailed {
            token,
            kind: ImageFailure::Pull,
            message: "down".into(),
        },
        10_000,
        &p,
    );
    assert_eq!(r.reason, Some(Reason::ImagePullBackOff));
    assert_eq!(r.phase, Phase::Pending);
    // Invalid images say so every time.
    let mut r = Replica::new(0);
    let a = r.handle(Event::Start, 0, &p);
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!()
    };
    r.handle(
        Event::ImageFailed {
            token,
            kind: ImageFailure::Invalid,
            message: "bad".into(),
        },
        0,
        &p,
    );
    assert_eq!(r.reason, Some(Reason::InvalidImage));
}

#[test]
fn stale_reports_are_ignored() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    let t = run(&mut r, &p, 0, "c1");
    let before = r.clone();
    assert!(r
        .handle(
            Event::Exited {
                token: t - 1,
                code: Some(1),
                oom: false
            },
            1,
            &p
        )
        .is_empty());
    assert!(r
        .handle(Event::TimerFired { token: t + 5 }, 1, &p)
        .is_empty());
    assert_eq!(r, before);
}

#[test]
fn stop_terms_then_kills_after_grace() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    let t = run(&mut r, &p, 0, "c");
    let a = r.handle(
        Event::Stop {
            grace: Duration::from_secs(3),
        },
        0,
        &p,
    );
    assert!(a.contains(&Action::Terminate {
        container_id: "c".into()
    }));
    let (timer, after) = timer_of(&a);
    assert_eq!(after, Duration::from_secs(3));
    let a = r.handle(Event::TimerFired { token: timer }, 3000, &p);
    assert!(a.contains(&Action::KillAll {
        container_id: "c".into()
    }));
    // The exit that follows (same token as the running container) completes the stop and
    // does not restart anything.
    let a = r.handle(
        Event::Exited {
            token: t,
            code: Some(137),
            oom: false,
        },
        3100,
        &p,
    );
    assert!(r.is_stopped());
    assert_eq!(a, vec![Action::Persist]);
    assert_eq!(r.restarts, 0);
}

#[test]
fn stop_during_create_stops_the_new_container() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(0);
    let a = r.handle(Event::Start, 0, &p);
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!()
    };
    r.handle(
        Event::ImageReady {
            token,
            container_id: "c".into(),
        },
        0,
        &p,
    );
    assert!(r
        .handle(
            Event::Stop {
                grace: Duration::from_secs(1)
            },
            0,
            &p
        )
        .is_empty());
    let a = r.handle(
        Event::Started {
            token: r.token,
            identity: ident(7),
        },
        1,
        &p,
    );
    assert!(a.contains(&Action::Terminate {
        container_id: "c".into()
    }));
    assert!(matches!(r.stage, Stage::Stopping { .. }));
    // A stop while idle or backing off completes at once, and late image results are
    // ignored.
    let mut r = Replica::new(1);
    let a = r.handle(Event::Start, 0, &p);
    let Some(Action::PrepareImage { token }) = a.last().cloned() else {
        panic!()
    };
    r.handle(
        Event::Stop {
            grace: Duration::ZERO,
        },
        0,
        &p,
    );
    assert!(r.is_stopped());
    assert!(r
        .handle(
            Event::ImageReady {
                token,
                container_id: "late".into()
            },
            1,
            &p
        )
        .is_empty());
    assert!(r.is_stopped());
}

#[test]
fn probe_thresholds_flip_readiness() {
    let mut p = policy(RestartPolicy::Always);
    p.has_probe = true;
    p.success_threshold = 2;
    p.failure_threshold = 2;
    let mut r = Replica::new(0);
    let t = run(&mut r, &p, 0, "c");
    assert!(!r.ready);
    r.handle(Event::Probe { token: t, ok: true }, 1, &p);
    assert!(!r.ready);
    r.handle(Event::Probe { token: t, ok: true }, 2, &p);
    assert!(r.ready);
    r.handle(
        Event::Probe {
            token: t,
            ok: false,
        },
        3,
        &p,
    );
    assert!(r.ready);
    r.handle(
        Event::Probe {
            token: t,
            ok: false,
        },
        4,
        &p,
    );
    assert!(!r.ready);
}

#[test]
fn lost_containers_restart_or_fail_by_policy() {
    let mut r = Replica::new(0);
    r.phase = Phase::Running;
    let a = r.handle(Event::Lost, 0, &policy(RestartPolicy::Always));
    assert_eq!(r.restarts, 1);
    assert!(matches!(a.last(), Some(Action::PrepareImage { .. })));
    let mut r = Replica::new(0);
    r.handle(Event::Lost, 0, &policy(RestartPolicy::Never));
    assert_eq!(
        (r.phase, r.reason.clone()),
        (Phase::Failed, Some(Reason::Unknown))
    );
}

#[test]
fn adopted_containers_run_with_their_start_time() {
    let mut p = policy(RestartPolicy::Always);
    p.has_probe = true;
    let mut r = Replica::new(0);
    let a = r.handle(
        Event::Adopted {
            container_id: "c".into(),
            identity: ident(9),
            started_at_ms: 77,
        },
        100,
        &p,
    );
    assert_eq!(r.started_at_ms(), Some(77));
    assert!(a.iter().any(|a| matches!(a, Action::StartProbe { .. })));
    assert!(!r.ready);
}

#[test]
fn record_round_trips() {
    let p = policy(RestartPolicy::Always);
    let mut r = Replica::new(3);
    run(&mut r, &p, 5, "c");
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"stage\":\"running\""), "{json}");
    let back: Replica = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}
