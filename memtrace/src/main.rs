fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));
    let mut ebpf = aya::EbpfLoader::new().load(obj).unwrap();
    for (name, p) in ebpf.programs_mut() {
        let p: &mut aya::programs::UProbe = p.try_into().unwrap();
        p.load().unwrap_or_else(|e| panic!("{name}: {e:?}"));
        println!("{name} loaded");
    }
}
