import { constants } from "node:os";
import { errnoError, type NativeModule } from "./native.js";

const { EAGAIN, EMFILE, ENFILE, ENOBUFS, ENOMEM } = constants.errno;

/** Accept failures of this host (out of descriptors or memory): the port stops accepting for this long, then tries again. */
const PAUSE_WHEN_EXHAUSTED_MS = 100;

/** What a native acceptor tells its owner. */
export interface AcceptorHooks {
  /** A new connection: its descriptor is the owner's (to dial with, or close). */
  accepted(fd: number): void;
  /** An accept failed (out of descriptors or memory: the port then pauses, and resumes by itself). */
  acceptFailed(err: Error): void;
}

/**
 * A listening TCP socket whose connections are accepted by the native
 * module, a batch per readable event, each handed on as a bare descriptor:
 * no Node socket is made for a connection the worker carries in C.
 */
export class NativeAcceptor {
  private poller: unknown;
  private pauseTimer: NodeJS.Timeout | undefined;
  private closed = false;

  private constructor(
    private readonly module: NativeModule,
    private readonly fd: number,
    private readonly accepted: Int32Array,
    private readonly hooks: AcceptorHooks,
  ) {
    this.poller = module.poll(fd, () => this.readable());
  }

  /** Binds and listens on a literal IP address; throws the bind's or listen's error. Connections inherit Nagle off and keep-alive. */
  static listen(module: NativeModule, host: string, port: number, backlog: number, keepAliveIdleS: number, hooks: AcceptorHooks): NativeAcceptor {
    const fd = module.listen(host, port, backlog, keepAliveIdleS);
    if (fd < 0) throw errnoError(fd, "listen", `${host}:${port}`);
    return new NativeAcceptor(module, fd, new Int32Array(64), hooks);
  }

  private readable(): void {
    const n = this.module.accept(this.fd, this.accepted);
    if (n < 0) {
      const code = -n;
      if (code === EMFILE || code === ENFILE || code === ENOBUFS || code === ENOMEM) {
        // The connection stays in the backlog and the socket readable: without a pause this would spin.
        this.unpoll();
        this.pauseTimer = setTimeout(() => {
          this.pauseTimer = undefined;
          if (!this.closed) this.poller = this.module.poll(this.fd, () => this.readable());
        }, PAUSE_WHEN_EXHAUSTED_MS);
      }
      // EAGAIN: nothing waiting (a client that reset before its accept is skipped by the module).
      if (code !== EAGAIN) this.hooks.acceptFailed(errnoError(n, "accept"));
      return;
    }
    for (let i = 0; i < n; i++) {
      const fd = this.accepted[i] as number;
      // Closed by a hook mid-batch: the rest of the batch is closed with it.
      if (this.closed) this.module.close(fd);
      else this.hooks.accepted(fd);
    }
  }

  private unpoll(): void {
    if (this.poller === undefined) return;
    this.module.unpoll(this.poller);
    this.poller = undefined;
  }

  /** Stops accepting and frees the port; connections already handed on are not touched. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.pauseTimer);
    this.unpoll();
    this.module.close(this.fd);
  }
}
