//! Type objects of a CPython process, by address: each read once, checked
//! to be a type (its own type is a type, its name a short printable C
//! string), and named as Python shows it: a class as `module.Class` (its
//! `__module__`, read from its `tp_dict`), a built-in type as its
//! `__name__` (`dict`, `bytes`, `OrderedDict`). The target owns these
//! bytes: a type that fails the checks is not named, and what points to it
//! is not counted as an object.

use rustc_hash::FxHashMap;

use crate::{
    process::memory::{AddressSpace, PageCache},
    python::layouts::{DictTable, Layout, UNICODE_ASCII, UNICODE_COMPACT},
};

/// Longest type name read; CPython's are short.
const MAX_NAME: usize = 256;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: set on `type` and every metaclass.
const TYPE_SUBCLASS: u64 = 1 << 31;
/// `Py_TPFLAGS_HAVE_GC`.
pub const HAVE_GC: u64 = 1 << 14;
/// `Py_TPFLAGS_HEAPTYPE`: a class, whose module is in its dict.
pub const HEAPTYPE: u64 = 1 << 9;
/// A class's dict holds a few dozen entries; more is not one.
const MAX_CLASS_DICT: u64 = 4096;
/// `Py_TPFLAGS_READY`: set on every type in use, once `PyType_Ready` ran.
const READY: u64 = 1 << 12;
/// Instance sizes a type may have: at least an object's two words.
const BASICSIZE: std::ops::RangeInclusive<u64> = 16..=(1 << 20);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// `__name__`: the part of `tp_name` after its last dot.
    pub name: String,
    pub flags: u64,
    /// Its type: `type`, or a metaclass.
    pub metatype: u64,
    /// `tp_basicsize`, `tp_itemsize`, and `tp_alloc`: the function that
    /// allocates its instances.
    pub basic_size: u64,
    pub item_size: u64,
    pub alloc: u64,
    /// Where `tp_name` pointed when the type was read: a type freed and
    /// replaced at the same address names itself elsewhere.
    name_pointer: u64,
}

#[derive(Default)]
pub struct TypeNames {
    /// Types by address, with the census that last checked each. What is
    /// not a type is not kept: a census asks of millions of pointers that
    /// are none (a pool block's other words), each a few cached reads to
    /// refuse, and a table of them costs more than reading again.
    types: FxHashMap<u64, (TypeInfo, u64)>,
    census: u64,
}

impl TypeNames {
    /// Starts a census: types seen in the last one are checked again,
    /// once, when next asked for; the others are forgotten, so that a
    /// process creating and dropping classes does not grow the table.
    pub fn next_census(&mut self) {
        let last = self.census;
        self.types.retain(|_, (_, checked)| *checked == last);
        self.census += 1;
    }

    /// The types found in this census so far.
    pub fn checked(&self) -> impl Iterator<Item = (u64, &TypeInfo)> {
        self.types
            .iter()
            .filter(|(_, (_, checked))| *checked == self.census)
            .map(|(&address, (info, _))| (address, info))
    }

    /// The type at `address` if it was found to be one in this census:
    /// the cheap question to ask of many candidates before checking one.
    pub fn known(&self, address: u64) -> Option<&TypeInfo> {
        match self.types.get(&address) {
            Some((info, checked)) if *checked == self.census => Some(info),
            _ => None,
        }
    }

    /// The type at `address`, if it is one. A type seen in an earlier
    /// census is trusted again only if its name pointer is unchanged.
    pub fn get<A: AddressSpace>(
        &mut self,
        memory: &mut PageCache<A>,
        layout: &Layout,
        address: u64,
    ) -> Option<&TypeInfo> {
        let census = self.census;
        let fresh = match self.types.get(&address) {
            Some((_, checked)) if *checked == census => true,
            Some((info, _)) => memory.u64(address.wrapping_add(layout.type_name)).ok() == Some(info.name_pointer),
            None => false,
        };
        if fresh {
            let entry = self.types.get_mut(&address).expect("present");
            entry.1 = census;
        } else {
            match read_type(memory, layout, address) {
                Some(info) => self.types.insert(address, (info, census)),
                None => self.types.remove(&address),
            };
        }
        self.types.get(&address).map(|(info, _)| info)
    }
}

fn read_type<A: AddressSpace>(memory: &mut PageCache<A>, layout: &Layout, address: u64) -> Option<TypeInfo> {
    if address == 0 || !address.is_multiple_of(8) {
        return None;
    }
    // ob_type follows ob_refcnt. A type's type is a metatype, whose own
    // type is one too (`type(type) is type`): a word that merely points at
    // an object does not pass both.
    let metatype = memory.u64(address.wrapping_add(8)).ok()?;
    let is_metatype = |memory: &mut PageCache<A>, t: u64| {
        memory.u64(t.wrapping_add(layout.type_flags)).is_ok_and(|flags| flags & TYPE_SUBCLASS != 0)
    };
    let metametatype = memory.u64(metatype.wrapping_add(8)).ok()?;
    if !is_metatype(memory, metatype) || !is_metatype(memory, metametatype) {
        return None;
    }
    let flags = memory.u64(address.wrapping_add(layout.type_flags)).ok()?;
    let basic_size = memory.u64(address.wrapping_add(layout.type_basicsize)).ok()?;
    if flags & READY == 0 || !BASICSIZE.contains(&basic_size) {
        return None;
    }
    // tp_itemsize follows tp_basicsize, and tp_alloc is five words after
    // tp_dict (tp_descr_get, tp_descr_set, tp_dictoffset, tp_init between),
    // in every version.
    let item_size = memory.u64(address.wrapping_add(layout.type_basicsize + 8)).ok()?;
    let alloc = memory.u64(address.wrapping_add(layout.type_dict + 40)).ok()?;
    let name_pointer = memory.u64(address.wrapping_add(layout.type_name)).ok()?;
    let full = c_string(memory, name_pointer)?;
    let short = full.rsplit('.').next().unwrap_or(&full);
    let name = match (flags & HEAPTYPE != 0).then(|| module_of(memory, layout, address)).flatten() {
        Some(module) if module != "builtins" => format!("{module}.{short}"),
        _ => short.to_owned(),
    };
    Some(TypeInfo { name, flags, metatype, basic_size, item_size, alloc, name_pointer })
}

/// A class's `__module__`: the value of the entry of its `tp_dict` whose
/// key is that str, when both are ASCII strs.
fn module_of<A: AddressSpace>(memory: &mut PageCache<A>, layout: &Layout, class: u64) -> Option<String> {
    let dict = memory.u64(class.wrapping_add(layout.type_dict)).ok()?;
    let d = &layout.dict;
    let keys = memory.u64(dict.wrapping_add(d.keys)).ok()?;
    let entries = memory.u64(keys.wrapping_add(d.nentries)).ok()?;
    let (index_bytes, entry_size, key_at) = match d.table {
        DictTable::Sized(at) => {
            let size = memory.u64(keys.wrapping_add(at)).ok()?;
            // DK_IXSIZE: the narrowest index that holds the table's size.
            let per_index = [0xff, 0xffff, 0xffff_ffff].iter().position(|&max| size <= max).map_or(8, |i| 1 << i);
            (size.checked_mul(per_index)?, 24, 8)
        }
        DictTable::Log2 { index_bytes, kind, .. } => {
            let mut byte = [0];
            memory.read(keys.wrapping_add(index_bytes), &mut byte).ok()?;
            let indices = 1u64.checked_shl(u32::from(byte[0]))?;
            memory.read(keys.wrapping_add(kind), &mut byte).ok()?;
            // DICT_KEYS_GENERAL is 0; the str-only kinds drop the hash.
            if byte[0] == 0 { (indices, 24, 8) } else { (indices, 16, 0) }
        }
    };
    if entries > MAX_CLASS_DICT || index_bytes > MAX_CLASS_DICT * 8 {
        return None;
    }
    let first = keys.wrapping_add(d.indices + index_bytes);
    (0..entries).find_map(|i| {
        let entry = first.wrapping_add(i * entry_size + key_at);
        let key = memory.u64(entry).ok()?;
        if ascii_str(memory, layout, key)? != "__module__" {
            return None;
        }
        let value = memory.u64(entry.wrapping_add(8)).ok()?;
        ascii_str(memory, layout, value)
    })
}

/// A compact ASCII str's text, if `object` is one of at most MAX_NAME
/// printable characters.
fn ascii_str<A: AddressSpace>(memory: &mut PageCache<A>, layout: &Layout, object: u64) -> Option<String> {
    let length = memory.u64(object.wrapping_add(layout.unicode_length)).ok()?;
    let state = memory.u32(object.wrapping_add(layout.unicode_state)).ok()?;
    if state & UNICODE_COMPACT == 0 || state & UNICODE_ASCII == 0 || length == 0 || length > MAX_NAME as u64 {
        return None;
    }
    let mut text = vec![0; length as usize];
    memory.read(object.wrapping_add(layout.unicode_ascii_data), &mut text).ok()?;
    text.iter().all(|b| b.is_ascii_graphic()).then(|| String::from_utf8(text).expect("ASCII"))
}

/// A NUL-terminated, printable ASCII string of at most [`MAX_NAME`] bytes.
fn c_string<A: AddressSpace>(memory: &mut PageCache<A>, address: u64) -> Option<String> {
    let mut bytes = Vec::new();
    for i in 0..MAX_NAME as u64 {
        let mut byte = [0];
        memory.read(address.wrapping_add(i), &mut byte).ok()?;
        match byte[0] {
            0 => break,
            b if b.is_ascii_graphic() || b == b' ' => bytes.push(b),
            _ => return None,
        }
    }
    (!bytes.is_empty() && bytes.len() < MAX_NAME).then(|| String::from_utf8(bytes).expect("ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::memory::Image, python::layouts::PY312};

    /// `type` at 0x1000 (its own type), `Record` at 0x2000 whose name is
    /// at 0x3000, and a word of garbage at 0x4000.
    fn image() -> Image {
        let mut image = Image::default();
        image.write_u64(0x1000 + 8, 0x1000);
        image.write_u64(0x1000 + PY312.type_flags, TYPE_SUBCLASS | READY);
        image.write_u64(0x1000 + PY312.type_basicsize, 920);
        image.write_u64(0x1000 + PY312.type_name, 0x3100);
        image.write_bytes(0x3100, b"type\0");
        image.write_u64(0x2000 + 8, 0x1000);
        image.write_u64(0x2000 + PY312.type_flags, HAVE_GC | READY);
        image.write_u64(0x2000 + PY312.type_basicsize, 32);
        image.write_u64(0x2000 + PY312.type_name, 0x3000);
        image.write_bytes(0x3000, b"app.Record\0");
        image.write_u64(0x4000 + 8, 0x4000);
        image
    }

    #[test]
    fn names_checked_types_by_their_short_name() {
        let mut memory = PageCache::new(image(), 1 << 20);
        let mut names = TypeNames::default();
        let record = names.get(&mut memory, &PY312, 0x2000).unwrap();
        assert_eq!((record.name.as_str(), record.flags), ("Record", HAVE_GC | READY));
        assert_eq!(names.get(&mut memory, &PY312, 0x1000).unwrap().name, "type");
        assert!(names.get(&mut memory, &PY312, 0x4000).is_none(), "its type is no type");
        assert!(names.get(&mut memory, &PY312, 0x9000).is_none(), "unmapped");
        assert!(names.get(&mut memory, &PY312, 0x2001).is_none(), "misaligned");
    }

    #[test]
    fn what_is_not_ready_or_sized_like_an_object_is_no_type() {
        let mut image = image();
        image.write_u64(0x2000 + PY312.type_flags, HAVE_GC);
        let mut memory = PageCache::new(image, 1 << 20);
        assert!(TypeNames::default().get(&mut memory, &PY312, 0x2000).is_none(), "not ready");
        let mut image = self::image();
        image.write_u64(0x2000 + PY312.type_basicsize, 1 << 40);
        let mut memory = PageCache::new(image, 1 << 20);
        assert!(TypeNames::default().get(&mut memory, &PY312, 0x2000).is_none(), "no such size");
        // An object whose type is a plain class, not a metatype.
        let mut image = self::image();
        image.write_u64(0x5000 + 8, 0x2000);
        let mut memory = PageCache::new(image, 1 << 20);
        assert!(TypeNames::default().get(&mut memory, &PY312, 0x5000).is_none(), "an instance");
    }

    #[test]
    fn types_unseen_in_the_last_census_are_forgotten() {
        let mut memory = PageCache::new(image(), 1 << 20);
        let mut names = TypeNames::default();
        names.next_census();
        assert!(names.get(&mut memory, &PY312, 0x2000).is_some());
        names.next_census();
        assert!(names.types.contains_key(&0x2000), "seen in the last census");
        names.next_census();
        assert!(names.types.is_empty(), "not asked for in the census before");
    }

    #[test]
    fn garbage_names_are_refused() {
        let mut image = image();
        image.write_bytes(0x3000, b"app\x01Record\0");
        let mut memory = PageCache::new(image, 1 << 20);
        assert!(TypeNames::default().get(&mut memory, &PY312, 0x2000).is_none());
        let mut image = self::image();
        image.write_bytes(0x3000, &[b'x'; 300]);
        let mut memory = PageCache::new(image, 1 << 20);
        assert!(TypeNames::default().get(&mut memory, &PY312, 0x2000).is_none(), "too long");
    }
}
