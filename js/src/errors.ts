/** Error codes a {@link P2PError} carries: the server's codes, the remote peer's reply codes, and local ones. */
export type P2PErrorCode =
  // From the server (PROTOCOL.md section 11).
  | "BadRequest"
  | "NotRegistered"
  | "AlreadyRegistered"
  | "UidTaken"
  | "UnknownPeer"
  | "PeerOffline"
  | "UnknownRoom"
  | "PayloadTooLarge"
  | "Busy"
  | "RateLimited"
  | "Unauthorized"
  | "UnknownEvent"
  | "BadSignal"
  | "Unsupported"
  | "ServiceTaken"
  | "NoSuchService"
  | "ServiceGone"
  | "Timeout"
  // From a remote peer's ReplyError.
  | "NoHandler"
  | "NoReply"
  | "BadPayload"
  // Local.
  | "Rejected"
  | "Closed"
  | "Refused"
  | (string & {});

/** Every failure of this library: `code` says what happened, `message` explains. */
export class P2PError extends Error {
  override name = "P2PError";
  constructor(
    readonly code: P2PErrorCode,
    message: string,
    /** Extra fields of a server error (`event`, `to`, `seq`), or the peer a failure concerns. */
    readonly details: { event?: string; to?: string; seq?: number; peer?: string; remote?: boolean } = {},
  ) {
    super(message);
  }
}
