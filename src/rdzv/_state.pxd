# The rendezvous core, at a glance. Open this file first.
#
# Two machines live in _state.pyx:
#
# * the *run* machine: the state record at <run>/state, shared by every node and
#   changed only by compare-and-swap (one CAS per transition, never per join);
# * the *node* machine: what one node does next, given the state record it last
#   saw and what it has written itself. It never does I/O of its own: it returns
#   Actions (transactions as tuples, reads, wake times) for its driver to carry
#   out and takes the answers back, which keeps it testable without a server.

cpdef enum Status:
    # Run states, as stored in the state record. NONE means "no record yet".
    NONE = 0
    JOINABLE = 1    # round r accepts members
    FROZEN = 2      # round r's world is fixed; members confirm they are alive
    FINAL = 3       # round r is complete; late nodes wait for round r+1
    CLOSED = 4      # terminal for the run

cpdef enum Event:
    # Transitions of the run machine; each is one CAS on the state record.
    OPEN = 0        # NONE -> JOINABLE(0), FINAL(r) -> JOINABLE(r+1)
    FREEZE = 1      # JOINABLE(r) -> FROZEN(r)
    FINALIZE = 2    # FROZEN(r) -> FINAL(r)
    RESTART = 3     # FROZEN(r) -> JOINABLE(r+1): a world member died
    CLOSE = 4       # any -> CLOSED

cpdef enum Phase:
    # Where one node stands in the current call to next_rendezvous().
    IDLE = 0        # has not read the state yet
    JOINED = 1      # member of a joinable round, waiting for it to freeze
    CONFIRMED = 2   # in a frozen round's world, confirmed, waiting for final
    WAITING = 3     # late or surplus: waiting for the next round to open
    DONE = 4        # member of a final round: next_rendezvous() returns

cpdef enum Move:
    # Transitions of the node machine (_PHASES in _state.pyx: phase x move).
    BEGIN = 0       # any -> IDLE: a next_rendezvous() call starts
    JOIN = 1        # IDLE, JOINED, CONFIRMED, WAITING -> JOINED: put its member key
    CONFIRM = 2     # JOINED -> CONFIRMED: in the frozen round's world, confirmed
    SURPLUS = 3     # JOINED -> IDLE: the round froze without it
    REGISTER = 4    # IDLE, JOINED, CONFIRMED, WAITING -> WAITING: put its waiting key
    COMPLETE = 5    # CONFIRMED -> DONE: its round is final
    LEAVE = 6       # any -> IDLE: the call failed and its keys were withdrawn

cpdef enum Step:
    # What the node machine asks its driver to do next (an Action's step).
    STEP_WAIT = 0   # block until a watched event arrives or the clock reaches wake_at
    STEP_DONE = 1   # the task is over (the round is complete, the run closed)
    STEP_TXN = 2    # run a transaction and feed() its answer
    STEP_GET = 3    # read one key and feed() its answer


cdef class StateRecord:
    cdef readonly long long round
    cdef readonly int status
    cdef readonly int min_nodes
    cdef readonly int max_nodes
    cdef readonly long long cutoff
    cdef readonly int world_size
    cdef readonly long long last_final
    cpdef bytes encode(self)


cdef class Backoff:
    cdef double initial
    cdef double cap
    cdef double current
    cdef object rng                         # random.Random: the jitter's source


cdef class WatchSpec:
    # A watch the node wants held: Node.watches lists them, the driver diffs.
    cdef readonly str tag                   # "state", "round" or "waiting"
    cdef readonly bytes key                 # the key, or the prefix
    cdef readonly bint prefix
    cdef readonly long long start           # first revision delivered; 0: from now
    cdef readonly bint no_put               # deletions only


cdef class Action:
    # One thing for the driver to do; which fields count depends on step.
    cdef readonly int step
    cdef readonly list compares             # STEP_TXN
    cdef readonly list success
    cdef readonly list failure
    cdef readonly bint once                 # STEP_TXN: one attempt, no retries
    cdef readonly bint join                 # STEP_TXN: a join (merge_joins)
    cdef readonly bytes key                 # STEP_GET
    cdef readonly double wake_at            # STEP_WAIT
    cdef readonly object result             # STEP_DONE


cdef class Node:
    # The driver's side:
    #   node.begin(descriptor, wall_offset)   or   node.begin_close()
    #   loop: action = node.next_action(now)
    #         STEP_TXN/STEP_GET -> run it, node.feed(answer) or node.fail(error)
    #         STEP_WAIT -> hold node.watches (watch_started / watch_failed), feed
    #                      what they deliver (observe_*) until wake_at
    #         STEP_DONE -> action.result
    # Multi-request steps (join, freeze, confirm, CAS) are generators that
    # yield their requests; task holds the one in progress.
    # Identity and settings
    cdef readonly str node_id
    cdef readonly bytes run_prefix
    cdef readonly int min_nodes
    cdef readonly int max_nodes
    cdef readonly long long lease
    cdef readonly long long data_lease
    cdef readonly long long state_lease
    cdef readonly bytes descriptor
    cdef readonly double last_call_timeout

    # What the node last saw of the run
    cdef readonly object keys
    cdef readonly double liveness_interval
    cdef readonly StateRecord state
    cdef readonly long long state_mod

    # What this node did in the current call
    cdef readonly Phase phase
    cdef readonly long long joined_round
    cdef readonly long long join_revision
    cdef readonly long long completed_round
    cdef readonly StateRecord completed     # the final record of completed_round
    cdef readonly long long completed_mod
    cdef StateRecord confirmed_state        # the frozen record this node confirmed in
    cdef long long confirmed_mod
    cdef readonly int rank
    cdef readonly list world
    cdef readonly long long waiting_round
    cdef readonly double wake_at
    cdef readonly double open_at
    cdef readonly double retry_at           # after a lost CAS: back off until then (or inf)
    cdef readonly double check_at           # when to check the state watch by a read
    cdef readonly long long state_watch_start  # the state watch delivers from here (0: none)
    cdef bint round_snapshot_due            # the freezer's round watch started: read it
    cdef double now                         # the driver's clock at this step
    cdef object task                        # generator of this call's actions
    cdef object reply                       # answer to its last request
    cdef object error                       # or the error it failed with
    cdef bint awaiting                      # a request is out
    cdef double wall_offset                 # wall clock minus the driver's clock
    cdef readonly bint freeze_pending
    cdef readonly bint counter              # this node counts the members of joined_round
    cdef readonly double poll_at            # when the counter (or freezer) counts next
    cdef double poll_delay
    cdef long long last_count
    cdef long long verified_count           # the freezer's confirmation count last checked by name
    cdef bint last_call_armed               # the counter armed the last call (wake_at)
    cdef bint announce_due                  # ... and has yet to publish its deadline
    cdef readonly double counter_watch_at   # when a joiner starts watching the counter key
    cdef bint counter_gone                  # that watch saw the key deleted
    cdef readonly bint freezer
    cdef readonly set confirmed
    cdef set world_ids                      # the freezer's world
    cdef readonly bint check_liveness
    cdef readonly long long watch_revision
    cdef readonly long long freeze_round
    cdef bint world_member_lost
    cdef list stale_keys
    cdef Backoff backoff
    cdef readonly tuple master

    cdef int _move(self, int move) except -1
    cdef int _start(self, task) except -1
    cdef int _joined(self, long long round, long long revision, long long count,
                     int min_nodes, int max_nodes, double now) except -1
    cdef int _stop_freezing(self) except -1
    cdef bint _counting(self)
    cdef int _poll_after(self, long long count, double now) except -1
    cdef int _counted(self, long long count, int min_nodes, int max_nodes,
                      double now) except -1
    cdef int _start_counting(self, long long round, long long count, int min_nodes,
                             int max_nodes, double now) except -1


cdef class RunView:
    # A member's picture of the run after it completed a round, kept current by
    # one watch (see watch_spec) and a read now and then; num_nodes_waiting()
    # and is_closed() answer from it without asking etcd.
    cdef readonly object keys
    cdef readonly long long round           # the round this node completed
    cdef readonly long long cutoff          # that round's freeze revision
    cdef readonly frozenset world           # its members' node ids this node knows
    cdef readonly long long world_size      # how many members it has
    cdef readonly StateRecord state         # the newest state record seen
    cdef readonly long long state_mod
    cdef readonly bint state_unreadable     # the record vanished or cannot be decoded
    cdef readonly long long revision        # every change up to here is applied
    cdef readonly long long read_revision   # revision of the last read
    cdef readonly bint read_counted         # the last read counted the round's members
    cdef readonly long long watched_revision  # a watch delivered everything up to here
    cdef readonly double verified_at        # when a read or a live connection last confirmed it
    cdef readonly double check_interval
    cdef set waiting                        # late and surplus nodes of the round
    cdef set next_members                   # nodes that joined the round after it
    cdef set lost                           # world members whose key vanished
    cdef long long unlisted                 # counted by a read beyond its listing
    cdef long long unnamed_lost             # world members a read found missing
    cdef bytes members_prefix
    cdef bytes waiting_prefix
    cdef bytes next_prefix

    cdef int _observe_state(self, value, long long mod_revision) except -1
    cdef int _apply(self, bint is_put, bytes key, value, long long revision) except -1
    cdef int _member_deleted(self, bytes key) except -1
    cpdef long long num_waiting(self)
