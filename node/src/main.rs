mod produce;
mod traffic;

fn main() {}
