/** The pure protocol core, for tests and other drivers: no I/O, time passed in. */
export * from "./codec.js";
export { Link, FRAGMENT_SIZE, RTO_MIN, RTO_MAX, ACK_DELAY } from "./link.js";
export type { Delivery, LinkOptions } from "./link.js";
export { AckTable } from "./acks.js";
export type { AckResult } from "./acks.js";
export { Session, PROTOCOL_VERSION, REQUEST_TIMEOUT } from "./session.js";
export type { Request, Response, HelloOutcome } from "./session.js";
export { toWire, fromWire } from "./payload.js";
export { Streams } from "./streams.js";
export type { P2PStream, IncomingStream } from "./streams.js";
export { Negotiation, BUSY, APP_DOWNGRADE } from "./negotiate.js";
export type { Action, Signal, Phase, NegotiationOptions } from "./negotiate.js";
