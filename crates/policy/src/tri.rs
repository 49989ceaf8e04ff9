//! Three-valued matching, shared by every rule form ([`crate::authz`] and
//! [`crate::clause`]) so that they combine unknowns identically.

/// Three-valued match: an attribute that cannot be known here is `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tri {
    No,
    Yes,
    Unknown,
}

impl Tri {
    pub(crate) fn from_bool(b: bool) -> Self {
        if b { Self::Yes } else { Self::No }
    }

    pub(crate) fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::No, _) | (_, Self::No) => Self::No,
            (Self::Yes, Self::Yes) => Self::Yes,
            _ => Self::Unknown,
        }
    }

    pub(crate) fn or(self, other: Self) -> Self {
        match (self, other) {
            (Self::Yes, _) | (_, Self::Yes) => Self::Yes,
            (Self::No, Self::No) => Self::No,
            _ => Self::Unknown,
        }
    }

    pub(crate) fn not(self) -> Self {
        match self {
            Self::Yes => Self::No,
            Self::No => Self::Yes,
            Self::Unknown => Self::Unknown,
        }
    }
}

/// `positive` any-of and `negative` none-of, each vacuous when empty.
pub(crate) fn field<T>(positive: &[T], negative: &[T], mut test: impl FnMut(&T) -> Tri) -> Tri {
    let any = |vals: &[T], test: &mut dyn FnMut(&T) -> Tri| {
        vals.iter().fold(Tri::No, |acc, v| acc.or(test(v)))
    };
    let p = if positive.is_empty() {
        Tri::Yes
    } else {
        any(positive, &mut test)
    };
    let n = if negative.is_empty() {
        Tri::Yes
    } else {
        any(negative, &mut test).not()
    };
    p.and(n)
}

/// Any of `n` alternatives (vacuously true when there are none: an absent clause).
pub(crate) fn any_of(n: usize, f: impl Fn(usize) -> Tri) -> Tri {
    if n == 0 {
        Tri::Yes
    } else {
        (0..n).fold(Tri::No, |acc, i| acc.or(f(i)))
    }
}
