//! Parsing of `s3:http(s)://HOST[:PORT][,HOST[:PORT]...]/BUCKET[/PREFIX]`
//! repository names.

use vbackup_storage::{ErrorKind, Result, StorageError};

/// Where an S3 repository lives: endpoint, bucket and key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `http://HOST:PORT` or `https://HOST[:PORT]`, without a path: the
    /// first (or only) endpoint.
    pub endpoint: String,
    /// Every endpoint named, the first one included: nodes of one cluster
    /// serving the same buckets, tried in turn when one fails.
    pub endpoints: Vec<String>,
    /// The bucket name.
    pub bucket: String,
    /// Folder inside the bucket holding the repository, without leading or
    /// trailing `/`; empty for the bucket's root.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3:https://HOST[:PORT]/BUCKET[/PREFIX]` (or `s3:http://…`);
    /// several endpoints of one cluster are separated by commas:
    /// `s3:http://node1:3900,node2:3900/BUCKET`.
    pub fn parse(repo: &str) -> Result<Self> {
        let bad = |why: &str| {
            StorageError::new(
                ErrorKind::Other,
                repo,
                format!(
                    "not an S3 repository name ({why}); expected s3:https://HOST[:PORT]/BUCKET[/PREFIX]"
                ),
            )
        };
        let rest = repo
            .strip_prefix("s3:")
            .ok_or_else(|| bad("no 's3:' scheme"))?;
        let (scheme, rest) = rest
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| bad("the endpoint must start with http:// or https://"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<&str> = host.split(',').collect();
        if hosts
            .iter()
            .any(|h| h.is_empty() || h.contains(['@', '?', '#']))
        {
            return Err(bad("no host, or a host with user, query or fragment"));
        }
        let path = path.trim_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Err(bad("the prefix has an empty, '.' or '..' part"));
        }
        let endpoints: Vec<String> = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
        Ok(Self {
            endpoint: endpoints[0].clone(),
            endpoints,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The repository name back, for messages.
    pub fn display(&self) -> String {
        let scheme_end = self.endpoint.find("://").map_or(0, |i| i + 3);
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.get(scheme_end..).unwrap_or(e))
            .collect();
        let endpoint = format!("{}{}", &self.endpoint[..scheme_end], hosts.join(","));
        if self.prefix.is_empty() {
            format!("s3:{endpoint}/{}", self.bucket)
        } else {
            format!("s3:{endpoint}/{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn several_endpoints_of_one_cluster_are_kept_in_order() {
        let name = "s3:http://10.0.0.1:3900,10.0.0.2:3900/vm/prod";
        let l = S3Location::parse(name).unwrap();
        assert_eq!(
            l.endpoints,
            ["http://10.0.0.1:3900", "http://10.0.0.2:3900"]
        );
        assert_eq!(l.endpoint, "http://10.0.0.1:3900");
        assert_eq!(l.bucket, "vm");
        assert_eq!(l.display(), name);
        assert!(S3Location::parse("s3:http://a:1,,b:2/vm").is_err());
        assert!(S3Location::parse("s3:http://a:1,/vm").is_err());
    }

    #[test]
    fn endpoint_bucket_and_prefix_are_split() {
        let l = S3Location::parse("s3:https://s3.example.org:9000/backups/vm/prod/").unwrap();
        assert_eq!(l.endpoint, "https://s3.example.org:9000");
        assert_eq!(l.bucket, "backups");
        assert_eq!(l.prefix, "vm/prod");
        assert_eq!(
            l.display(),
            "s3:https://s3.example.org:9000/backups/vm/prod"
        );
        let l = S3Location::parse("s3:http://127.0.0.1:3900/b").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("b", ""));
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "https://h/b",
            "s3:ftp://h/b",
            "s3:https://h",
            "s3:https://h/",
            "s3:https:///b",
            "s3:https://u@h/b",
            "s3:https://h/b/x//y",
            "s3:https://h/b/../y",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
