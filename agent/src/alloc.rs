//! Which subnet this node should hold: flannel's order of preference, as a pure function of the
//! registry's contents. The etcd transaction that makes the choice stick lives in `registry`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::netconf::NetworkConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("out of subnets: all {total} subnets of /{len} between {min} and {max} are leased or reserved")]
    Exhausted { total: usize, len: u8, min: Ipv4Addr, max: Ipv4Addr },
}

/// What the registry holds for one key, as far as allocation cares.
#[derive(Debug, Clone)]
pub struct Taken {
    pub subnet: Ipv4Net,
    /// `None` when the value could not be parsed: the subnet still counts as taken, because a
    /// malformed key is somebody's and must never be handed out twice.
    pub public_ip: Option<Ipv4Addr>,
    pub reservation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Choice {
    /// A key with our public IP exists and fits the config: keep it (renew, or for a reservation
    /// keep it lease-less).
    Existing { subnet: Ipv4Net, reservation: bool },
    /// Create this subnet's key; it was free when we looked (the create-if-absent transaction
    /// decides whether we won it).
    New(Ipv4Net),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub choice: Choice,
    /// Our own leases that no longer fit the config (flannel deletes these too).
    pub stale_own: Vec<Ipv4Net>,
}

/// How many free subnets to draw the random pick from (flannel's number): spreads nodes that start
/// together over different subnets so their create transactions rarely collide.
const RANDOM_POOL: usize = 100;

pub fn choose(
    cfg: &NetworkConfig,
    taken: &[Taken],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut impl Rng,
) -> Result<Plan, AllocError> {
    let mut stale_own = Vec::new();
    // 1. A lease or reservation that already carries our public IP: after a restart we get our
    //    subnet back, so pods keep their addresses.
    let mut mine: Vec<&Taken> = taken.iter().filter(|t| t.public_ip == Some(public_ip)).collect();
    mine.sort_by_key(|t| (!t.reservation, t.subnet)); // reservations win, then lowest subnet
    for t in &mine {
        if cfg.allows(&t.subnet) && cfg.network.contains(&t.subnet) {
            let choice = Choice::Existing { subnet: t.subnet, reservation: t.reservation };
            stale_own.extend(mine.iter().filter(|o| o.subnet != t.subnet && !o.reservation).map(|o| o.subnet));
            return Ok(Plan { choice, stale_own });
        }
        if !t.reservation {
            stale_own.push(t.subnet);
        }
    }
    let overlaps = |n: &Ipv4Net| {
        taken.iter().any(|t| t.subnet.contains(&n.network()) || n.contains(&t.subnet.network()))
    };
    // 2. The subnet we had before (subnet.env or state dir), if nobody took it meanwhile.
    if let Some(prev) = previous {
        let prev = prev.trunc();
        if cfg.allows(&prev) && !overlaps(&prev) {
            return Ok(Plan { choice: Choice::New(prev), stale_own });
        }
    }
    // 3. A random one among the first free ones.
    let free: Vec<Ipv4Net> = cfg.candidate_subnets().filter(|n| !overlaps(n)).take(RANDOM_POOL).collect();
    if free.is_empty() {
        return Err(AllocError::Exhausted {
            total: cfg.candidate_subnets().count(),
            len: cfg.subnet_len,
            min: cfg.subnet_min,
            max: cfg.subnet_max,
        });
    }
    Ok(Plan { choice: Choice::New(free[rng.gen_range(0..free.len())]), stale_own })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/22","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#).unwrap()
    }
    fn t(subnet: &str, ip: Option<&str>, reservation: bool) -> Taken {
        Taken { subnet: subnet.parse().unwrap(), public_ip: ip.map(|s| s.parse().unwrap()), reservation }
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn same_public_ip_gets_its_subnet_back() {
        let taken = [t("10.244.1.0/24", Some("198.18.0.10"), false), t("10.244.2.0/24", Some("198.18.0.11"), false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.11"), None, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Existing { subnet: "10.244.2.0/24".parse().unwrap(), reservation: false });
    }

    #[test]
    fn reservations_are_honoured_and_never_given_away() {
        let taken = [t("10.244.1.0/24", Some("198.18.0.99"), true), t("10.244.2.0/24", Some("198.18.0.10"), false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.99"), None, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Existing { subnet: "10.244.1.0/24".parse().unwrap(), reservation: true });
        // Somebody else gets the one free subnet, never the reserved one.
        for seed in 0..20 {
            let p = choose(&cfg(), &taken, ip("198.18.0.12"), None, &mut rand::rngs::StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(p.choice, Choice::New("10.244.3.0/24".parse().unwrap()));
        }
    }

    #[test]
    fn previous_subnet_is_preferred_when_free() {
        let prev = Some("10.244.3.1/24".parse().unwrap());
        let p = choose(&cfg(), &[], ip("198.18.0.10"), prev, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::New("10.244.3.0/24".parse().unwrap()));
        let taken = [t("10.244.3.0/24", Some("198.18.0.50"), false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.10"), prev, &mut rng()).unwrap();
        assert_ne!(p.choice, Choice::New("10.244.3.0/24".parse().unwrap()));
    }

    #[test]
    fn malformed_keys_still_count_as_taken() {
        let taken = [t("10.244.1.0/24", None, false), t("10.244.2.0/24", None, false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.10"), None, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::New("10.244.3.0/24".parse().unwrap()));
    }

    #[test]
    fn overlapping_keys_of_another_length_are_respected() {
        // A /23 left over from an older config covers .2 and .3.
        let taken = [t("10.244.2.0/23", Some("198.18.0.50"), false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.10"), None, &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::New("10.244.1.0/24".parse().unwrap()));
    }

    #[test]
    fn our_lease_that_no_longer_fits_is_replaced() {
        let taken = [t("10.244.9.0/24", Some("198.18.0.10"), false)];
        let p = choose(&cfg(), &taken, ip("198.18.0.10"), None, &mut rng()).unwrap();
        assert_eq!(p.stale_own, vec!["10.244.9.0/24".parse::<Ipv4Net>().unwrap()]);
        assert!(matches!(p.choice, Choice::New(_)));
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let taken = [t("10.244.0.0/22", Some("198.18.0.50"), false)];
        let e = choose(&cfg(), &taken, ip("198.18.0.10"), None, &mut rng()).unwrap_err();
        assert!(e.to_string().contains("out of subnets: all 3 subnets"), "{e}");
    }

    #[test]
    fn random_picks_spread() {
        let seen: std::collections::HashSet<_> = (0..50)
            .map(|s| choose(&cfg(), &[], ip("198.18.0.10"), None, &mut rand::rngs::StdRng::seed_from_u64(s)).unwrap().choice)
            .collect();
        assert!(seen.len() > 1);
    }
}
