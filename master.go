// master(8) plumbing: Postfix's generic daemon options, the status channel
// on fd 5, the listening sockets from fd 6 on, chroot and privilege drop,
// and the daemon_timeout watchdog (postfix-tlsmgr.md §6).
//
// SECURITY: master(8) is trusted; it runs us as root with -u and -c, and
// everything that needs a path is opened before chroot() and setuid(),
// files in data_directory as mail_owner (files.go). The status channel
// tells master that a process has served as soon as it has, so that a
// crash under load is not throttled like a broken command.

package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Descriptors that master(8) hands every child.
const (
	masterStatusFd = 5
	masterListenFd = 6
)

// daemonOptions are Postfix's generic daemon options (getopt
// "cdDi:lm:n:o:s:St:uvVz").
type daemonOptions struct {
	chroot, debugMode, debugger, solitary, stdinStream, dropPrivs, stderr bool
	verbose                                                               int
	serviceName, transport                                                string
	listenFds                                                             int
	overrides                                                             []string
	strayArgs                                                             []string
}

// parseDaemonArgs parses argv the way getopt(3) does for Postfix daemons,
// including bundled flags (-cu) and attached values (-ofoo=bar).
func parseDaemonArgs(args []string) (*daemonOptions, error) {
	o := &daemonOptions{listenFds: 1}
	withValue := map[byte]bool{'i': true, 'm': true, 'n': true, 'o': true, 's': true, 't': true}
	i := 0
	for ; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			i++
			break
		}
		if len(a) < 2 || a[0] != '-' {
			break
		}
		for j := 1; j < len(a); j++ {
			c := a[j]
			var val string
			if withValue[c] {
				if j+1 < len(a) {
					val = a[j+1:]
				} else if i+1 < len(args) {
					i++
					val = args[i]
				} else {
					return o, fmt.Errorf("option requires an argument -- '%c'", c)
				}
				j = len(a)
			}
			switch c {
			case 'c':
				o.chroot = true
			case 'd':
				o.debugMode = true
			case 'D':
				o.debugger = true
			case 'l':
				o.solitary = true
			case 'S':
				o.stdinStream = true
			case 'u':
				o.dropPrivs = true
			case 'v':
				o.verbose++
			case 'V':
				o.stderr = true
			case 'z':
			case 'i', 'm':
				// max_idle and max_use: tlsmgr never exits for them.
				if _, err := parseTime(val, 's'); err != nil {
					return o, fmt.Errorf("bad -%c value %q: want a number", c, val)
				}
			case 'n':
				o.serviceName = val
			case 'o':
				o.overrides = append(o.overrides, val)
			case 's':
				n, err := strconv.Atoi(val)
				if err != nil || n <= 0 {
					return o, fmt.Errorf("invalid socket_count: %s", val)
				}
				o.listenFds = n
			case 't':
				o.transport = val
			default:
				return o, fmt.Errorf("invalid option: %c", c)
			}
		}
	}
	o.strayArgs = args[i:]
	return o, nil
}

// masterStatus writes the 12-byte status records master(8) expects:
// {int32 pid, uint32 generation, int32 avail}. Connections are served
// concurrently, so we say "taken" when a request starts while we are
// marked available, and "available" once no request has been in flight
// for availDelay. With a process limit of 1 master needs no more, and a
// busy server does not wake master twice per request.
//
// master counts a process as having served (use_count) only when it goes
// from taken to available, and throttles the service for a minute when a
// process that never served dies. So the first request to end sends
// "available" at once, even with others in flight, followed by "taken"
// again if they are: a tlsmgr that has been busy since it started and then
// crashes is restarted at once, as stock tlsmgr would be.
type masterStatus struct {
	mu         sync.Mutex // taken to send a record or arm the timer
	file       *os.File
	generation uint32
	onLost     func() // master is gone: save state and exit

	// Every request passes here twice; these let it pass without the
	// lock unless a record may be due.
	inFlight   atomic.Int64
	taken      atomic.Bool  // the last record sent said "taken"
	served     atomic.Bool  // master has seen taken -> available once
	lastIdle   atomic.Int64 // monoNow when no request was left in flight
	availArmed atomic.Bool  // availTimer will check whether to send "available"
	availTimer *time.Timer
}

// availDelay is how long we stay "taken" after the last request ends.
const availDelay = 20 * time.Millisecond

// generationFromEnv parses $GENERATION, which master(8) writes in octal.
func generationFromEnv() (uint32, error) {
	g := os.Getenv("GENERATION")
	if g == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(g, 8, 32)
	if err != nil {
		return 0, fmt.Errorf("bad generation: %s", g)
	}
	return uint32(n), nil
}

func (m *masterStatus) send(avail int32) error {
	var rec [12]byte
	binary.LittleEndian.PutUint32(rec[0:], uint32(os.Getpid()))
	binary.LittleEndian.PutUint32(rec[4:], m.generation)
	binary.LittleEndian.PutUint32(rec[8:], uint32(avail))
	_, err := m.file.Write(rec[:])
	return err
}

func (m *masterStatus) busy() {
	m.inFlight.Add(1)
	if m.taken.Load() {
		return // sendAvail sees this request before it says "available"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.taken.Load() {
		m.taken.Store(true)
		m.sendOrExit(0)
	}
}

func (m *masterStatus) idle() {
	left := m.inFlight.Add(-1)
	if !m.served.Load() {
		m.mu.Lock()
		if !m.served.Load() {
			m.served.Store(true)
			m.taken.Store(false)
			m.sendOrExit(1)
			if m.inFlight.Load() > 0 {
				m.taken.Store(true)
				m.sendOrExit(0)
			}
			m.mu.Unlock()
			return
		}
		m.mu.Unlock()
	}
	if left > 0 {
		return
	}
	m.lastIdle.Store(int64(monoNow()))
	if m.availArmed.CompareAndSwap(false, true) {
		m.mu.Lock()
		if m.availTimer == nil {
			m.availTimer = time.AfterFunc(availDelay, m.sendAvail)
		} else {
			m.availTimer.Reset(availDelay)
		}
		m.mu.Unlock()
	}
}

// sendOrExit sends a record; if master cannot take it, it is gone, and we
// exit as Postfix's servers do (onLost runs on its own goroutine, because
// an orderly exit waits for the request that called us).
func (m *masterStatus) sendOrExit(avail int32) {
	if err := m.send(avail); err != nil {
		msg.debug("master status write failed: %v -- exiting", err)
		go m.onLost()
	}
}

// sendAvail runs availDelay after a request left none in flight, and says
// "available" once none has been in flight for availDelay.
func (m *masterStatus) sendAvail() {
	defer logPanic() // it runs from a timer, on a goroutine of its own
	m.mu.Lock()
	defer m.mu.Unlock()
	m.availArmed.Store(false) // from here on, a request that ends arms it again
	if m.inFlight.Load() > 0 {
		return
	}
	if wait := availDelay - (monoNow() - time.Duration(m.lastIdle.Load())); wait > 0 {
		if m.availArmed.CompareAndSwap(false, true) {
			m.availTimer.Reset(wait)
		}
		return
	}
	if !m.taken.Load() {
		return
	}
	m.taken.Store(false)
	if m.inFlight.Load() > 0 { // busy saw "taken" before we cleared it
		m.taken.Store(true)
		return
	}
	m.sendOrExit(1)
}

// watchMaster blocks until master closes its end of the status channel
// (it exited, or "postfix reload" replaced us), then calls onLost.
func (m *masterStatus) watchMaster() {
	defer logPanic()
	var b [1]byte
	for {
		n, err := m.file.Read(b[:])
		if n == 0 || err != nil {
			msg.debug("master disconnect -- exiting")
			m.onLost()
			return
		}
	}
}

// masterListeners wraps fds 6.. as listeners of the given transport.
func masterListeners(transport string, count int) ([]net.Listener, error) {
	switch transport {
	case "unix", "inet":
	case "pass":
		return nil, fmt.Errorf("transport type %q is not supported by this tlsmgr; use \"unix\" in master.cf", transport)
	case "":
		return nil, fmt.Errorf("no transport type specified (master.cf gives -t unix)")
	default:
		return nil, fmt.Errorf("unsupported transport type: %s", transport)
	}
	var lns []net.Listener
	for fd := masterListenFd; fd < masterListenFd+count; fd++ {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("listen socket fd %d", fd))
		ln, err := net.FileListener(f) // dups the fd; netpoll handles EAGAIN
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("listen socket fd %d: %v", fd, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// mailOwner is mail_owner, looked up before chroot (the jail has no passwd).
type mailOwner struct {
	name     string
	uid, gid int
	groups   []int
}

func lookupMailOwner(name string) (*mailOwner, error) { return lookupUser("mail_owner", name) }

// lookupUser looks up the user that param names; root is refused.
func lookupUser(param, name string) (*mailOwner, error) {
	what := "parameter " + param
	if strings.HasPrefix(param, "-") {
		what = "option " + param
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("%s: unknown user name value: %s", what, name)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if uid == 0 {
		return nil, fmt.Errorf("%s: user %s has privileged user ID: %d", what, name, uid)
	}
	if gid == 0 {
		return nil, fmt.Errorf("%s: user %s has privileged group ID: %d", what, name, gid)
	}
	owner := &mailOwner{name: name, uid: uid, gid: gid}
	if ids, err := u.GroupIds(); err == nil {
		for _, g := range ids {
			if n, err := strconv.Atoi(g); err == nil && n != 0 {
				owner.groups = append(owner.groups, n)
			}
		}
	}
	if len(owner.groups) == 0 {
		owner.groups = []int{gid}
	}
	return owner, nil
}

// enterJail chroots to dir (with -c) and drops to owner (with -u): real,
// effective and saved uid and gid, and the groups. Go applies setuid and
// setgid to every thread of the process. Changing credentials makes the
// process dumpable again: it is made undumpable once more.
func enterJail(dir string, chroot bool, owner *mailOwner) error {
	if chroot {
		if err := syscall.Chroot(dir); err != nil {
			return fmt.Errorf("chroot(%s): %s", dir, errText(err))
		}
		if err := os.Chdir("/"); err != nil {
			return fmt.Errorf("chdir(/): %s", errText(err))
		}
	}
	if owner != nil {
		if os.Geteuid() != 0 { // root only as real or saved uid: take it back to drop it for good
			if err := syscall.Seteuid(0); err != nil {
				return fmt.Errorf("seteuid(0): %s", errText(err))
			}
		}
		if err := syscall.Setgroups(owner.groups); err != nil {
			return fmt.Errorf("initgroups(%s, %d): %s", owner.name, owner.gid, errText(err))
		}
		if err := syscall.Setgid(owner.gid); err != nil {
			return fmt.Errorf("setgid(%d): %s", owner.gid, errText(err))
		}
		if err := syscall.Setuid(owner.uid); err != nil {
			return fmt.Errorf("setuid(%d): %s", owner.uid, errText(err))
		}
		if anyRoot() || anyRootGroup() {
			r, e, s := getresuid()
			return fmt.Errorf("setuid(%d): uids are still %d, %d, %d, or a gid is 0", owner.uid, r, e, s)
		}
	}
	noCoreDumps()
	return nil
}

// getresuid returns the real, effective and saved uid.
func getresuid() (r, e, s int) { return getres(syscall.SYS_GETRESUID) }

func getres(call uintptr) (r, e, s int) {
	var ids [3]uint32
	syscall.RawSyscall(call, uintptr(unsafe.Pointer(&ids[0])), uintptr(unsafe.Pointer(&ids[1])), uintptr(unsafe.Pointer(&ids[2])))
	return int(ids[0]), int(ids[1]), int(ids[2])
}

// anyRoot reports whether the real, effective or saved uid is root's: a
// process with any of them can become root again, so it is root.
func anyRoot() bool {
	r, e, s := getresuid()
	return r == 0 || e == 0 || s == 0
}

func anyRootGroup() bool {
	r, e, s := getres(syscall.SYS_GETRESGID)
	return r == 0 || e == 0 || s == 0
}

// mustHaveDropped is the first thing post-init does: from here on
// everything may read what mail_owner wrote, so no uid may be root's.
func mustHaveDropped() {
	if anyRoot() {
		r, e, s := getresuid()
		msg.fatal("post-jail initialization with uids %d, %d, %d: privileges were not dropped", r, e, s)
	}
}

// noCoreDumps keeps secrets (the PRNG state, ticket keys, sessions) out of
// core files and out of reach of ptrace by other processes of the same
// user: no core file at all, and the process is not dumpable. The kernel
// makes a process dumpable again whenever its credentials change, so this
// runs at start and after every change.
func noCoreDumps() {
	syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{})
	const prSetDumpable = 4
	syscall.RawSyscall(syscall.SYS_PRCTL, prSetDumpable, 0, 0)
}

// giveNewDirectory makes the directory dir as root and gives it to owner,
// through a descriptor of the directory just made: nobody else can have
// it yet, as only root may write to the directories on its way
// (makeOwnersDirectory). It is standalone mode's data directory; under
// master(8) data_directory is Postfix's.
func giveNewDirectory(dir string, owner *mailOwner) error {
	if err := syscall.Mkdir(dir, 0o700); err != nil {
		return err
	}
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Uid != 0 || st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return fmt.Errorf("it changed while it was made")
	}
	return syscall.Fchown(fd, owner.uid, owner.gid)
}

// startupWatchdog ends a start that hangs (daemon_timeout), as the
// watchdog ends a daemon that does: pre-init and post-init wait on files,
// locks, sockets and name services. Stop it once serving begins.
func startupWatchdog(cfg *config) *time.Timer {
	timeout := time.Duration(cfg.mustNum("daemon_timeout")) * time.Second
	return time.AfterFunc(timeout, func() { msg.fatal("watchdog timeout during start-up") })
}

// watchdog ends a process that has stopped making progress: every third of
// daemon_timeout it checks that the shared state can still be taken (the
// ticket-key lock, the PRNG, the cache writer); if a check has not come
// back within daemon_timeout, it logs Postfix's fatal message.
func watchdog(timeout time.Duration, check func()) {
	done := make(chan struct{}, 1)
	for {
		go func() {
			defer logPanic()
			check()
			done <- struct{}{}
		}()
		select {
		case <-done:
			time.Sleep(timeout / 3)
		case <-time.After(timeout):
			msg.fatal("watchdog timeout")
		}
	}
}
