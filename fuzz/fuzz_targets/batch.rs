//! The batch codec on arbitrary bytes and text: splitting never panics; a batch that splits
//! is rebuilt byte for byte from its frames; base64 text that decodes encodes back to
//! itself (canonical padding) and the binary round trip holds.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use socketio_p2p_signaling::protocol::{
    BatchWriter, batch_from_base64, batch_to_base64, split_batch,
};

fn check_binary(batch: &Bytes) {
    let Ok(frames) = split_batch(batch) else {
        return;
    };
    assert!(!frames.is_empty());
    let mut w = BatchWriter::new();
    for f in &frames {
        assert!(!f.is_empty());
        w.push(f);
    }
    assert_eq!(w.count(), frames.len());
    let rebuilt = w.take();
    // Varints may have redundant forms (0x80 0x00 for 0): the rebuilt batch is canonical and
    // splits into the same frames.
    let again = split_batch(&rebuilt).expect("a rebuilt batch splits");
    assert_eq!(again, frames);
    if rebuilt.len() == batch.len() {
        assert_eq!(&rebuilt, batch);
    }
    let text = batch_to_base64(&rebuilt);
    assert_eq!(batch_from_base64(&text).expect("own base64"), rebuilt);
}

fuzz_target!(|data: &[u8]| {
    check_binary(&Bytes::copy_from_slice(data));
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(batch) = batch_from_base64(text)
    {
        check_binary(&batch);
    }
});
