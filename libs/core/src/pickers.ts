/**
 * The backend picker of the data plane. Pure: the worker hands it the current
 * number of backends and it says where a connection starts. (UDP's FIFO
 * primary is the first backend in rotation: see the worker's UdpListener.)
 */

/**
 * Round-robin per new connection. The counter lives across backend-set
 * updates so a new set does not restart the rotation at its first backend.
 */
export class RoundRobin {
  private next = 0;

  /**
   * Index in a list of `n` backends where a new connection starts; on refusal
   * the caller tries the following ones, wrapping around. -1 when empty.
   */
  start(n: number): number {
    if (n <= 0) return -1;
    const index = this.next % n;
    this.next = index + 1;
    return index;
  }
}
