//! The VM definition written beside restored disks, rewritten to describe
//! them: each disk's path *and* its image format.
//!
//! A restore may change a disk's format (a qcow2 disk restored with
//! `--format raw`). A definition that still said `type='qcow2'` for the
//! raw file would not boot (QEMU would read the raw bytes as a qcow2
//! header), so the format goes with the path:
//!
//! - libvirt domain XML: in the `<disk>` whose `<source file=…/>` (or
//!   `dev=…`) is the disk's backup-time source, the source becomes the
//!   restored file and `<driver type=…/>` its format; other disks are left
//!   as they are.
//! - a QEMU command line: in the option whose `file=` (`-drive`) or
//!   `filename=` / `file.filename=` (`-blockdev`) is the source, the path
//!   is replaced and `format=` / the format node's `driver=` set.
//! - the QMP report of a live backup: strings naming the source name the
//!   restored file, and the format nodes on it (`drv` equal to the source
//!   format) get the restored format.
//!
//! Any other text only has the paths replaced, as before.

use serde_json::Value;

/// One restored disk, as the definition must now refer to it.
#[derive(Debug, Clone, Copy)]
pub struct RestoredImage<'a> {
    /// Where the disk was read from at backup time (the manifest's `source`).
    pub source: &'a str,
    /// The format it had then (the manifest's `format`).
    pub source_format: &'a str,
    /// Where it was restored.
    pub path: &'a str,
    /// The restored file's format (`raw`, `qcow2`...).
    pub format: &'a str,
}

/// A stored configuration file (`--config` at backup) rewritten for the
/// restored disks: libvirt domain XML by element, anything else as a QEMU
/// command line.
pub fn rewrite_config(content: &str, disks: &[RestoredImage<'_>]) -> String {
    let disks: Vec<RestoredImage<'_>> = disks
        .iter()
        .copied()
        .filter(|d| !d.source.is_empty())
        .collect();
    if content.contains("<domain") {
        return rewrite_domain_xml(content, &disks);
    }
    rewrite_command_line(content, &disks)
}

/// The QMP report of a live backup (`VmDefinition::qmp`) rewritten for
/// the restored disks, in place.
pub fn rewrite_qmp_report(report: &mut Value, disks: &[RestoredImage<'_>]) {
    for disk in disks.iter().filter(|d| !d.source.is_empty()) {
        rewrite_json(report, disk);
    }
}

/// Replaces the source path in every string of `value`, and the format
/// of every node object on it (`"file": path` with `"drv"` the source
/// format; protocol nodes such as `"drv": "file"` are left alone).
fn rewrite_json(value: &mut Value, disk: &RestoredImage<'_>) {
    match value {
        Value::String(text) if text.contains(disk.source) => {
            *text = text.replace(disk.source, disk.path);
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_json(v, disk)),
        Value::Object(map) => {
            map.values_mut().for_each(|v| rewrite_json(v, disk));
            // Block nodes say `file` and `drv`; image information says
            // `filename` and `format`.
            for (path_key, format_key) in [("file", "drv"), ("filename", "format")] {
                let on_disk = map.get(path_key).and_then(Value::as_str) == Some(disk.path);
                let format = map.get(format_key).and_then(Value::as_str);
                if on_disk && format == Some(disk.source_format) {
                    map.insert(format_key.into(), Value::String(disk.format.into()));
                }
            }
        }
        _ => {}
    }
}

// ---- libvirt domain XML ----

/// Rewrites each `<disk>` element whose source is one of `disks`.
fn rewrite_domain_xml(xml: &str, disks: &[RestoredImage<'_>]) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = find_tag(rest, "disk") {
        let Some(len) = rest[start..]
            .find("</disk>")
            .map(|end| end + "</disk>".len())
        else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str(&rewrite_disk_element(&rest[start..start + len], disks));
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

/// One `<disk>…</disk>` element, rewritten if its own `<source>` (not a
/// `<backingStore>`'s) names one of `disks`.
fn rewrite_disk_element(element: &str, disks: &[RestoredImage<'_>]) -> String {
    let own = &element[..element.find("<backingStore").unwrap_or(element.len())];
    let Some(source) = find_tag(own, "source").map(|at| tag_span(own, at)) else {
        return element.to_string();
    };
    let source_tag = &own[source.clone()];
    let found = ["file", "dev"].into_iter().find_map(|name| {
        let value = attribute(source_tag, name)?;
        let disk = disks.iter().find(|d| unescape(&value.text) == d.source)?;
        Some((name, value, disk))
    });
    let Some((name, value, disk)) = found else {
        return element.to_string();
    };
    // The restored disk is a file, whatever the source was (an LVM volume).
    let mut new_source = String::new();
    new_source.push_str(&source_tag[..value.name_start]);
    new_source.push_str(&format!(
        "file={q}{}{q}",
        escape(disk.path, value.quote),
        q = value.quote
    ));
    new_source.push_str(&source_tag[value.end..]);
    let mut text = format!(
        "{}{}{}",
        &element[..source.start],
        new_source,
        &element[source.end..]
    );
    if name == "dev" {
        text = set_disk_type_file(&text);
    }
    set_driver_type(&text, disk.format)
}

/// The disk element's opening tag with `type='file'`.
fn set_disk_type_file(element: &str) -> String {
    let open = tag_span(element, 0);
    let tag = set_attribute(&element[open.clone()], "type", "file");
    format!("{tag}{}", &element[open.end..])
}

/// The disk element with its `<driver>` saying `type=format`, or with a
/// `<driver name='qemu' type=format/>` added before its `<source>`.
fn set_driver_type(element: &str, format: &str) -> String {
    let own = &element[..element.find("<backingStore").unwrap_or(element.len())];
    if let Some(at) = find_tag(own, "driver") {
        let span = tag_span(element, at);
        let tag = set_attribute(&element[span.clone()], "type", format);
        return format!("{}{tag}{}", &element[..span.start], &element[span.end..]);
    }
    let Some(at) = find_tag(own, "source") else {
        return element.to_string();
    };
    let line_start = element[..at].rfind('\n').map_or(at, |i| i + 1);
    let indent = &element[line_start..at];
    let indent = match indent.trim().is_empty() {
        true => format!("\n{indent}"),
        false => String::new(),
    };
    format!(
        "{}<driver name='qemu' type='{}'/>{indent}{}",
        &element[..at],
        escape(format, '\''),
        &element[at..]
    )
}

/// Where the tag `<name` (followed by a space, `/` or `>`) begins in `text`.
fn find_tag(text: &str, name: &str) -> Option<usize> {
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = text[from..].find(&open) {
        let at = from + i;
        let next = text[at + open.len()..].chars().next();
        if next.is_some_and(|c| c.is_whitespace() || c == '/' || c == '>') {
            return Some(at);
        }
        from = at + open.len();
    }
    None
}

/// The span of the tag that begins at `at`, up to its `>` (quoted `>` in
/// attribute values skipped).
fn tag_span(text: &str, at: usize) -> std::ops::Range<usize> {
    let mut quote = None;
    for (i, c) in text[at..].char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return at..at + i + 1,
            _ => {}
        }
    }
    at..text.len()
}

/// An attribute found in a tag.
struct Attribute {
    /// Where its name begins.
    name_start: usize,
    /// Just past its closing quote.
    end: usize,
    /// The quote character used.
    quote: char,
    /// The raw (still escaped) value.
    text: String,
}

/// The attribute `name` of `tag`, if it has one.
fn attribute(tag: &str, name: &str) -> Option<Attribute> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name) {
        let name_start = from + i;
        from = name_start + name.len();
        let before = tag[..name_start].chars().next_back();
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let after = tag[from..].trim_start();
        let Some(after) = after.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let quote = after.chars().next().filter(|c| matches!(c, '\'' | '"'))?;
        let value_start = tag.len() - after.len() + 1;
        let close = tag[value_start..].find(quote)?;
        return Some(Attribute {
            name_start,
            end: value_start + close + 1,
            quote,
            text: tag[value_start..value_start + close].to_string(),
        });
    }
    None
}

/// `tag` with the attribute `name` set to `value` (replaced, or added
/// after the element name).
fn set_attribute(tag: &str, name: &str, value: &str) -> String {
    if let Some(found) = attribute(tag, name) {
        let q = found.quote;
        return format!(
            "{}{name}={q}{}{q}{}",
            &tag[..found.name_start],
            escape(value, q),
            &tag[found.end..]
        );
    }
    let name_end = tag
        .char_indices()
        .skip(1)
        .find(|(_, c)| c.is_whitespace() || *c == '/' || *c == '>')
        .map_or(tag.len(), |(i, _)| i);
    format!(
        "{} {name}='{}'{}",
        &tag[..name_end],
        escape(value, '\''),
        &tag[name_end..]
    )
}

/// An attribute value with the five predefined XML entities resolved.
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// `text` escaped for an attribute value quoted with `quote`.
fn escape(text: &str, quote: char) -> String {
    let text = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    match quote {
        '"' => text.replace('"', "&quot;"),
        _ => text.replace('\'', "&apos;"),
    }
}

// ---- QEMU command lines ----

/// Rewrites the `key=value,…` options that name a disk's source; any
/// other mention of a source path only has the path replaced.
fn rewrite_command_line(text: &str, disks: &[RestoredImage<'_>]) -> String {
    let words = split_words(text);
    let mut nodes: Vec<(String, &RestoredImage<'_>)> = Vec::new();
    let mut rewritten: Vec<String> = words
        .iter()
        .map(|word| match word {
            Word::Space(space) => space.to_string(),
            Word::Text(word) => rewrite_option(word, disks, &mut nodes),
        })
        .collect();
    // -blockdev driver=qcow2,file=NODE: the format node on a file node.
    for (word, original) in rewritten.iter_mut().zip(&words) {
        if matches!(original, Word::Text(_)) {
            *word = rewrite_format_node(word, &nodes);
        }
    }
    rewritten.concat()
}

/// A run of a command line: blanks, or the text between them.
enum Word<'a> {
    Space(&'a str),
    Text(&'a str),
}

/// `text` cut into blanks and words (a word keeps its quotes).
fn split_words(text: &str) -> Vec<Word<'_>> {
    let mut words = Vec::new();
    let mut start = 0;
    let mut in_space = None;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if in_space.is_some_and(|s| s != space) {
            words.push(word(&text[start..i], !space));
            start = i;
        }
        in_space = Some(space);
    }
    if start < text.len() {
        words.push(word(&text[start..], in_space.unwrap_or(false)));
    }
    words
}

fn word(text: &str, space: bool) -> Word<'_> {
    match space {
        true => Word::Space(text),
        false => Word::Text(text),
    }
}

/// One word of a command line: a `key=value,…` list naming a source gets
/// the restored path and format; else a source path in it is replaced.
/// File nodes (`driver=file,filename=…,node-name=N`) are noted in `nodes`.
fn rewrite_option<'a>(
    word: &str,
    disks: &'a [RestoredImage<'a>],
    nodes: &mut Vec<(String, &'a RestoredImage<'a>)>,
) -> String {
    let (open, body, close) = unquote(word);
    let mut pairs: Vec<Pair> = body.split(',').map(split_pair).collect();
    let named = pairs.iter().find_map(|(key, value)| {
        let disk = disks.iter().find(|d| value.as_deref() == Some(d.source))?;
        matches!(key.as_str(), "file" | "filename" | "file.filename").then(|| (key.clone(), disk))
    });
    let Some((key, disk)) = named else {
        return disks
            .iter()
            .fold(word.to_string(), |w, d| w.replace(d.source, d.path));
    };
    set_pair(&mut pairs, &key, disk.path);
    match key.as_str() {
        "file" => set_pair(&mut pairs, "format", disk.format),
        "file.filename" if value_of(&pairs, "driver").is_some() => {
            set_pair(&mut pairs, "driver", disk.format);
        }
        _ => {
            if let Some(node) = value_of(&pairs, "node-name") {
                nodes.push((node.to_string(), disk));
            }
        }
    }
    format!("{open}{}{close}", join_pairs(&pairs))
}

/// A `driver=FMT,file=NODE` option on a restored file node gets the
/// restored format.
fn rewrite_format_node(word: &str, nodes: &[(String, &RestoredImage<'_>)]) -> String {
    let (open, body, close) = unquote(word);
    let mut pairs: Vec<Pair> = body.split(',').map(split_pair).collect();
    let file = value_of(&pairs, "file");
    let on = nodes.iter().find(|(node, _)| file == Some(node.as_str()));
    let Some(&(_, disk)) = on else {
        return word.to_string();
    };
    if value_of(&pairs, "driver") != Some(disk.source_format) {
        return word.to_string();
    }
    set_pair(&mut pairs, "driver", disk.format);
    format!("{open}{}{close}", join_pairs(&pairs))
}

/// A word's opening quote, its content and its closing quote.
fn unquote(word: &str) -> (&str, &str, &str) {
    for q in ["'", "\""] {
        if word.len() >= 2 && word.starts_with(q) && word.ends_with(q) {
            return (q, &word[1..word.len() - 1], q);
        }
    }
    ("", word, "")
}

/// One `key=value` item (`value` `None` for a bare `key`).
pub(crate) type Pair = (String, Option<String>);

pub(crate) fn split_pair(item: &str) -> Pair {
    match item.split_once('=') {
        Some((key, value)) => (key.to_string(), Some(value.to_string())),
        None => (item.to_string(), None),
    }
}

/// The value of `key`, if the list has it with a value.
pub(crate) fn value_of<'p>(pairs: &'p [Pair], key: &str) -> Option<&'p str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_deref())
}

/// Sets `key` to `value`, appending the pair when it is missing.
fn set_pair(pairs: &mut Vec<Pair>, key: &str, value: &str) {
    match pairs.iter_mut().find(|(k, _)| k == key) {
        Some(pair) => pair.1 = Some(value.to_string()),
        None => pairs.push((key.to_string(), Some(value.to_string()))),
    }
}

/// The `key=value,...` text of `pairs`.
pub(crate) fn join_pairs(pairs: &[Pair]) -> String {
    pairs
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: RestoredImage<'static> = RestoredImage {
        source: "/var/lib/libvirt/images/web1.qcow2",
        source_format: "qcow2",
        path: "/tmp/r/web1.raw",
        format: "raw",
    };

    const DOMAIN: &str = "<domain type='kvm'>
  <name>web1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file=\"/iso/install.iso\"/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
";

    #[test]
    fn driver_type_in_the_restored_definition_follows_the_restored_format() {
        let out = rewrite_config(DOMAIN, &[WEB]);
        let expected = DOMAIN
            .replace(
                "<driver name='qemu' type='qcow2' cache='none'/>",
                "<driver name='qemu' type='raw' cache='none'/>",
            )
            .replace(WEB.source, WEB.path);
        assert_eq!(out, expected);
    }

    #[test]
    fn a_disk_without_a_driver_element_gets_one_and_a_block_source_becomes_a_file() {
        let xml = "<domain>\n  <disk type='block' device='disk'>\n    <source dev='/dev/vg/web1'/>\n    <target dev='vda'/>\n  </disk>\n</domain>";
        let disk = RestoredImage {
            source: "/dev/vg/web1",
            source_format: "raw",
            path: "/tmp/r/web1.qcow2",
            format: "qcow2",
        };
        let out = rewrite_config(xml, &[disk]);
        assert_eq!(
            out,
            "<domain>\n  <disk type='file' device='disk'>\n    <driver name='qemu' type='qcow2'/>\n    <source file='/tmp/r/web1.qcow2'/>\n    <target dev='vda'/>\n  </disk>\n</domain>"
        );
    }

    #[test]
    fn a_backing_store_source_is_not_taken_for_the_disk_and_paths_are_escaped() {
        let xml = "<domain><disk type=\"file\"><driver type=\"qcow2\"/><source file=\"/a&amp;b.qcow2\"/><backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore></disk></domain>";
        let disk = RestoredImage {
            source: "/a&b.qcow2",
            source_format: "qcow2",
            path: "/r/\"x\".raw",
            format: "raw",
        };
        let out = rewrite_config(xml, &[disk]);
        assert_eq!(out, "<domain><disk type=\"file\"><driver type=\"raw\"/><source file=\"/r/&quot;x&quot;.raw\"/><backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore></disk></domain>");
        let base = RestoredImage {
            source: "/base.qcow2",
            ..disk
        };
        assert_eq!(rewrite_config(xml, &[base]), xml, "backing store rewritten");
    }

    #[test]
    fn qemu_drive_options_get_the_restored_path_and_format() {
        let line = "qemu-system-x86_64 -m 1G \\\n  -drive file=/var/lib/libvirt/images/web1.qcow2,format=qcow2,if=virtio \\\n  -drive file=/other.qcow2,format=qcow2\n";
        let out = rewrite_config(line, &[WEB]);
        assert_eq!(out, "qemu-system-x86_64 -m 1G \\\n  -drive file=/tmp/r/web1.raw,format=raw,if=virtio \\\n  -drive file=/other.qcow2,format=qcow2\n");
        let no_format = "-drive 'file=/var/lib/libvirt/images/web1.qcow2,if=virtio'";
        assert_eq!(
            rewrite_config(no_format, &[WEB]),
            "-drive 'file=/tmp/r/web1.raw,if=virtio,format=raw'"
        );
        let hda = "-hda /var/lib/libvirt/images/web1.qcow2";
        assert_eq!(rewrite_config(hda, &[WEB]), "-hda /tmp/r/web1.raw");
    }

    #[test]
    fn qemu_blockdev_chains_get_the_restored_format() {
        let line = "-blockdev driver=file,filename=/var/lib/libvirt/images/web1.qcow2,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 -blockdev driver=qcow2,file=f9,node-name=d9";
        assert_eq!(
            rewrite_config(line, &[WEB]),
            "-blockdev driver=file,filename=/tmp/r/web1.raw,node-name=f0 -blockdev driver=raw,file=f0,node-name=d0 -blockdev driver=qcow2,file=f9,node-name=d9"
        );
        let one = "-blockdev driver=qcow2,file.driver=file,file.filename=/var/lib/libvirt/images/web1.qcow2,node-name=d0";
        assert_eq!(
            rewrite_config(one, &[WEB]),
            "-blockdev driver=raw,file.driver=file,file.filename=/tmp/r/web1.raw,node-name=d0"
        );
    }

    #[test]
    fn qmp_reports_name_the_restored_file_and_its_format() {
        let mut report = serde_json::json!({
            "block-devices": [{"device": "", "inserted": {"file": WEB.source, "drv": "qcow2",
                "image": {"filename": WEB.source, "format": "qcow2"}}}],
            "block-nodes": [
                {"node-name": "fmt0", "file": WEB.source, "drv": "qcow2"},
                {"node-name": "proto0", "file": WEB.source, "drv": "file"},
                {"node-name": "other", "file": "/other.qcow2", "drv": "qcow2"}
            ]
        });
        rewrite_qmp_report(&mut report, &[WEB]);
        assert_eq!(
            report,
            serde_json::json!({
                "block-devices": [{"device": "", "inserted": {"file": WEB.path, "drv": "raw",
                    "image": {"filename": WEB.path, "format": "raw"}}}],
                "block-nodes": [
                    {"node-name": "fmt0", "file": WEB.path, "drv": "raw"},
                    {"node-name": "proto0", "file": WEB.path, "drv": "file"},
                    {"node-name": "other", "file": "/other.qcow2", "drv": "qcow2"}
                ]
            })
        );
    }
}
