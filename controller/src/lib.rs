//! scratch
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Inner { pub ip_blocks: Option<Vec<String>>, pub port: Option<u16> }
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outer { pub rules: Vec<Inner> }
#[cfg(test)]
mod tests {
    #[test]
    fn t() {
        for doc in ["rules:\n- ipBlocks: [a]\n  foo: 1\n", "rules:\n- port: 70000\n", "rules:\n- ipBlocks: 3\n", "rules: {}\n"] {
            let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
            let r: Result<super::Outer, _> = serde_path_to_error::deserialize(v);
            let e = r.unwrap_err();
            println!("{} :: {}", e.path(), e.inner());
            let de = serde_yaml::Deserializer::from_str(doc);
            let r: Result<super::Outer, _> = serde_path_to_error::deserialize(de);
            let e = r.unwrap_err();
            println!("direct {} :: {}", e.path(), e.inner());
        }
    }
}
