//! Build script for leaktrace-preload.

fn main() {
    // An unresolved symbol in a preloaded library only shows up when ld.so loads it into the
    // traced program; `-z defs` makes it a link error here instead, e.g. if the sampler ever
    // renames the semaphore that src/tag.rs reads.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,defs");
}
