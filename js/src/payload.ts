/** Application values to wire payloads and back. */
import { type WirePayload, utf8 } from "./codec.js";
import { P2PError } from "./errors.js";

/** What can be sent as binary: sent as raw bytes, received as `Uint8Array`. */
export type BinaryLike = ArrayBuffer | ArrayBufferView;

export function isBinary(v: unknown): v is BinaryLike {
  return v instanceof ArrayBuffer || ArrayBuffer.isView(v);
}

export function isBlob(v: unknown): v is Blob {
  return typeof Blob !== "undefined" && v instanceof Blob;
}

/** Encodes a value: binary as is, anything else as JSON (`undefined` as an empty, null payload). */
export function toWire(v: unknown): WirePayload {
  if (v instanceof ArrayBuffer) return { binary: true, data: new Uint8Array(v) };
  if (ArrayBuffer.isView(v)) return { binary: true, data: new Uint8Array(v.buffer, v.byteOffset, v.byteLength) };
  if (v === undefined) return { binary: false, data: new Uint8Array(0) };
  let text: string | undefined;
  try {
    text = JSON.stringify(v);
  } catch (e) {
    throw new P2PError("BadPayload", `payload is not JSON: ${(e as Error).message}`);
  }
  if (text === undefined) throw new P2PError("BadPayload", `payload of type ${typeof v} is not JSON`);
  return { binary: false, data: utf8(text) };
}

const decoder = new TextDecoder("utf-8", { fatal: true });

/** Decodes a payload: `Uint8Array` for binary (a copy, so it owns its memory), a JSON value otherwise. */
export function fromWire(p: WirePayload): unknown {
  if (p.binary) return p.data.slice();
  if (p.data.length === 0) return null;
  try {
    return JSON.parse(decoder.decode(p.data));
  } catch (e) {
    throw new P2PError("BadPayload", `undecodable JSON payload: ${(e as Error).message}`);
  }
}
