//! Whole numbers in JSON bodies, as JSON Schema counts them: `2` and `2.0`
//! are the same integer (the document's `"type": "integer"` allows both),
//! `2.5` is not one. serde alone refuses `2.0` for an integer field.
//!
//! Use with `#[serde(deserialize_with = "whole::required")]`, or
//! `#[serde(default, deserialize_with = "whole::optional")]` for an
//! `Option` (`null` and absent are both `None`).

use std::{fmt, marker::PhantomData};

use serde::{
    Deserializer,
    de::{self, Visitor},
};

struct Whole<T>(PhantomData<T>);

impl<T: TryFrom<i64>> Whole<T> {
    fn fit<E: de::Error>(value: i64, shown: &dyn fmt::Display) -> Result<T, E> {
        T::try_from(value).map_err(|_| {
            E::custom(format_args!(
                "`{shown}` is out of range for {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl<'de, T: TryFrom<i64>> Visitor<'de> for Whole<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Self::fit(v, &v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        let signed =
            i64::try_from(v).map_err(|_| E::custom(format_args!("`{v}` is out of range")))?;
        Self::fit(signed, &v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // ±2^63 are the first floats past i64's range.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if v.fract() != 0.0 || !(-LIMIT..LIMIT).contains(&v) {
            return Err(E::invalid_type(de::Unexpected::Float(v), &self));
        }
        Self::fit(v as i64, &v)
    }
}

struct MaybeWhole<T>(PhantomData<T>);

impl<'de, T: TryFrom<i64>> Visitor<'de> for MaybeWhole<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        required(d).map(Some)
    }
}

/// An integer field: `2` or `2.0`.
pub fn required<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(Whole(PhantomData))
}

/// An optional integer field: `2`, `2.0`, `null` or absent.
pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
    d.deserialize_option(MaybeWhole(PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Body {
        #[serde(deserialize_with = "super::required")]
        n: i32,
        #[serde(default, deserialize_with = "super::optional")]
        m: Option<i64>,
    }

    fn parse(json: &str) -> Result<(i32, Option<i64>), String> {
        serde_json::from_str::<Body>(json)
            .map(|b| (b.n, b.m))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integral_floats_are_integers_and_fractions_are_not() {
        assert_eq!(parse(r#"{"n": 2}"#), Ok((2, None)));
        assert_eq!(parse(r#"{"n": 2.0, "m": 7.0}"#), Ok((2, Some(7))));
        assert_eq!(parse(r#"{"n": -3, "m": null}"#), Ok((-3, None)));
        assert!(parse(r#"{"n": 2.5}"#).is_err_and(|e| e.contains("expected an integer")));
        assert!(parse(r#"{"n": "2"}"#).is_err());
        assert!(parse(r#"{"n": 3000000000}"#).is_err_and(|e| e.contains("out of range")));
        assert!(parse(r#"{"n": 1, "m": 1e300}"#).is_err());
        assert!(
            parse(r#"{"n": 1, "m": 18446744073709551615}"#)
                .is_err_and(|e| e.contains("out of range"))
        );
    }
}
