// The PRNG pool: NIST SP 800-90A Hash_DRBG over SHA-256, seeded from the
// kernel, from tls_random_source (dev:, egd: or a plain file) and from the
// exchange file, stirred with the time of day on every request, and saved
// to the exchange file at start, at random intervals and on a clean exit.
//
// SECURITY: seed bytes and pool state are never logged; the state is
// overwritten when the process exits, after the last request was answered,
// and a wiped pool refuses to generate rather than run on from zeros. A
// weak or broken external source cannot weaken the pool below the kernel's
// entropy, which goes in at the start and at every reseed; a source that
// fails is retried, never a reason to stop serving seeds.

package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	seedLenBytes     = 55      // seedlen = 440 bits for SHA-256
	maxBytesPerCall  = 1 << 16 // 2^19 bits per generate request
	reseedInterval   = 1 << 48
	exchangeFileSize = 1024 // what Postfix reads and writes
	sourceTimeout    = 10 * time.Second
)

var (
	errNeedReseed      = errors.New("Hash_DRBG: reseed required")
	errNotInstantiated = errors.New("Hash_DRBG: not instantiated (the pool was wiped at exit)")
)

// hashDRBG is the bare mechanism of SP 800-90A §10.1.1; it is not safe for
// concurrent use (pool wraps it with a mutex). A reseedCounter of 0 means
// not instantiated: never used, or wiped.
type hashDRBG struct {
	v, c          [seedLenBytes]byte
	reseedCounter uint64
}

// hashDF is the derivation function of SP 800-90A §10.3.1: it fills dst,
// seedlen bytes, from the inputs. Its temporaries, which hold copies of
// the state, are wiped before it returns.
func hashDF(dst *[seedLenBytes]byte, inputs ...[]byte) {
	n := 5
	for _, in := range inputs {
		n += len(in)
	}
	buf := make([]byte, 5, n) // counter || no_of_bits_to_return || inputs
	binary.BigEndian.PutUint32(buf[1:], uint32(seedLenBytes*8))
	for _, in := range inputs {
		buf = append(buf, in...)
	}
	var block [sha256.Size]byte
	for counter, off := byte(1), 0; off < seedLenBytes; counter++ {
		buf[0] = counter
		block = sha256.Sum256(buf)
		off += copy(dst[off:], block[:])
	}
	clear(buf)
	clear(block[:])
}

func (d *hashDRBG) instantiate(entropy, nonce, personalization []byte) {
	hashDF(&d.v, entropy, nonce, personalization)
	hashDF(&d.c, []byte{0}, d.v[:])
	d.reseedCounter = 1
}

func (d *hashDRBG) reseed(entropy, additional []byte) error {
	if d.reseedCounter == 0 {
		return errNotInstantiated // reseeding would restart from a known (zero) V
	}
	var v [seedLenBytes]byte
	hashDF(&v, []byte{1}, d.v[:], entropy, additional)
	d.v = v
	clear(v[:])
	hashDF(&d.c, []byte{0}, d.v[:])
	d.reseedCounter = 1
	return nil
}

// addInto sets dst = (dst + src) mod 2^440, both big-endian; src may be
// shorter. Whole 64-bit words are added while src lasts (one request adds
// a 32-byte hash and the 55-byte C), then the carry runs on only as far
// as it goes (the reseed counter and block counter touch a few bytes).
func addInto(dst *[seedLenBytes]byte, src []byte) {
	if len(src) > seedLenBytes {
		src = src[len(src)-seedLenBytes:] // the rest is a multiple of 2^440
	}
	var carry uint64
	i, j := seedLenBytes, len(src) // the bytes not yet added end here
	for ; j >= 8; i, j = i-8, j-8 {
		var sum uint64
		sum, carry = bits.Add64(binary.BigEndian.Uint64(dst[i-8:i]), binary.BigEndian.Uint64(src[j-8:j]), carry)
		binary.BigEndian.PutUint64(dst[i-8:i], sum)
	}
	for ; j > 0; i, j = i-1, j-1 {
		sum := uint64(dst[i-1]) + uint64(src[j-1]) + carry
		dst[i-1], carry = byte(sum), sum>>8
	}
	for ; carry != 0 && i > 0; i-- {
		sum := uint64(dst[i-1]) + carry
		dst[i-1], carry = byte(sum), sum>>8
	}
}

// generate fills out (at most maxBytesPerCall) per SP 800-90A §10.1.1.4.
func (d *hashDRBG) generate(out, additional []byte) error {
	if len(out) > maxBytesPerCall {
		return fmt.Errorf("Hash_DRBG: %d bytes requested, at most %d per call", len(out), maxBytesPerCall)
	}
	if d.reseedCounter == 0 {
		return errNotInstantiated
	}
	if d.reseedCounter > reseedInterval {
		return errNeedReseed
	}
	if len(additional) > 0 {
		// w = Hash(0x02 || V || additional), hashed in one call from the
		// stack when additional is at most 32 bytes (a seed request's 8
		// bytes of time; NIST's vectors' 32).
		var in [1 + seedLenBytes + 32]byte
		buf := append(in[:0], 2)
		buf = append(buf, d.v[:]...)
		buf = append(buf, additional...)
		w := sha256.Sum256(buf)
		addInto(&d.v, w[:])
		clear(buf) // V's copy: in, or the heap when additional was longer
		clear(w[:])
	}
	data := d.v
	var block [sha256.Size]byte
	for n := 0; n < len(out); n += sha256.Size {
		block = sha256.Sum256(data[:])
		copy(out[n:], block[:])
		addInto(&data, []byte{1})
	}
	var prefixed [1 + seedLenBytes]byte // 0x03 || V
	prefixed[0] = 3
	copy(prefixed[1:], d.v[:])
	block = sha256.Sum256(prefixed[:])
	clear(prefixed[:])
	addInto(&d.v, block[:])
	addInto(&d.v, d.c[:])
	var ctr [8]byte
	binary.BigEndian.PutUint64(ctr[:], d.reseedCounter)
	addInto(&d.v, ctr[:])
	d.reseedCounter++
	clear(block[:])
	clear(data[:])
	return nil
}

func (d *hashDRBG) wipe() {
	clear(d.v[:])
	clear(d.c[:])
	d.reseedCounter = 0
}

// pool is the process's one source of random bytes: seed replies, ticket
// keys, the exchange file and the timer intervals all come from it.
type pool struct {
	mu   sync.Mutex
	drbg hashDRBG
}

// newPool instantiates from the kernel, with time and pid as personalization.
func newPool() (*pool, error) {
	entropy := make([]byte, 48) // 32 bytes of entropy plus a 16-byte nonce
	if _, err := io.ReadFull(rand.Reader, entropy); err != nil {
		return nil, fmt.Errorf("read kernel entropy: %v", err)
	}
	p := &pool{}
	p.drbg.instantiate(entropy[:32], entropy[32:], timePid())
	clear(entropy)
	return p, nil
}

func timePid() []byte {
	var b [20]byte
	binary.BigEndian.PutUint64(b[:], uint64(time.Now().UnixNano()))
	binary.BigEndian.PutUint32(b[8:], uint32(os.Getpid()))
	binary.BigEndian.PutUint64(b[12:], uint64(time.Now().Unix())^uint64(os.Getpid()))
	return b[:]
}

// read fills out, stirring in the time of day as additional input.
func (p *pool) read(out []byte) error {
	var now [8]byte
	binary.BigEndian.PutUint64(now[:], uint64(time.Now().UnixNano()))
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(out) > 0 {
		n := min(len(out), maxBytesPerCall)
		err := p.drbg.generate(out[:n], now[:])
		if errors.Is(err, errNeedReseed) {
			fresh := make([]byte, 32)
			if _, err := io.ReadFull(rand.Reader, fresh); err != nil {
				return err
			}
			err = p.drbg.reseed(fresh, now[:])
			clear(fresh)
			if err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		out = out[n:]
	}
	return nil
}

// Read makes the pool an io.Reader.
func (p *pool) Read(out []byte) (int, error) {
	if err := p.read(out); err != nil {
		return 0, err
	}
	return len(out), nil
}

// mix reseeds with external bytes; the kernel's share stays in V. A wiped
// pool stays wiped.
func (p *pool) mix(entropy []byte) error {
	var now [8]byte
	binary.BigEndian.PutUint64(now[:], uint64(time.Now().UnixNano()))
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.drbg.reseed(entropy, now[:])
}

// randomDelay returns period*r/255 seconds for a fresh random byte r, as
// Postfix schedules its reseed and exchange timers. Should the pool fail
// (it was wiped at exit), the whole period: never a busy loop.
func (p *pool) randomDelay(period int64) time.Duration {
	period = min(period, maxTimerPeriod)
	r := [1]byte{255}
	if err := p.read(r[:]); err != nil {
		r[0] = 255
	}
	return time.Duration(period*int64(r[0])/255) * time.Second
}

func (p *pool) wipe() {
	p.mu.Lock()
	p.drbg.wipe()
	p.mu.Unlock()
}

// wipeAtExit is wipe for the exit path, which must not hang: it waits a
// little for the lock, and wipes without it should a stuck goroutine hold
// it. Once wiped, the pool refuses to generate.
func (p *pool) wipeAtExit() {
	if lockSoon(&p.mu) {
		defer p.mu.Unlock()
	}
	p.drbg.wipe()
}

// lockSoon takes mu if it becomes free within 100 ms.
func lockSoon(mu *sync.Mutex) bool {
	for deadline := time.Now().Add(100 * time.Millisecond); ; time.Sleep(time.Millisecond) {
		if mu.TryLock() {
			return true
		}
		if !time.Now().Before(deadline) {
			return false
		}
	}
}

// entropySource is tls_random_source, opened before chroot. Postfix exits
// when it cannot open or read it, so that master(8) starts a process that
// reopens it; our pool takes fresh kernel entropy at every reseed, so
// exiting would buy nothing and stall every STARTTLS client. Instead a
// failing source is reopened at the next reseed (by its path, which in a
// chroot must exist under queue_directory), and the caller warns at most
// once a minute meanwhile.
type entropySource struct {
	spec string // the parameter value, for messages
	kind string // "dev", "egd", "file" or "" (none)
	path string
	// tls_random_bytes
	bytes int
	file  *os.File
	egd   net.Conn
	done  bool // a plain file is read once, then the source counts as empty
}

// openEntropySource opens the source as root, as Postfix does; a failure
// is a warning, and the source is retried at each reseed.
func openEntropySource(spec string, bytes int) *entropySource {
	s := &entropySource{spec: spec, bytes: bytes}
	switch {
	case spec == "":
		msg.warn("no entropy source specified with parameter tls_random_source")
		msg.warn("encryption keys etc. may be predictable")
		return s
	case strings.HasPrefix(spec, "dev:"):
		s.kind, s.path = "dev", spec[len("dev:"):]
	case strings.HasPrefix(spec, "egd:"):
		s.kind, s.path = "egd", spec[len("egd:"):]
	default:
		s.kind, s.path = "file", spec
	}
	if err := s.open(); err != nil {
		msg.warnLimited("entropy "+spec, "%v; reseeding from the kernel alone until it works again", err)
	}
	return s
}

// open opens the source without blocking: O_NONBLOCK, so that a FIFO, or a
// device that has nothing to give, cannot hold up start-up or a reseed.
func (s *entropySource) open() error {
	switch s.kind {
	case "dev":
		f, err := os.OpenFile(s.path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("cannot open entropy device %s: %s", s.path, errText(err))
		}
		s.file = f
	case "egd":
		c, err := net.DialTimeout("unix", s.path, sourceTimeout)
		if err != nil {
			return fmt.Errorf("cannot connect to EGD server %s: %s", s.path, errText(err))
		}
		s.egd = c
	case "file":
		f, err := os.OpenFile(s.path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("cannot open entropy file %s: %s", s.path, errText(err))
		}
		s.file = f
	}
	return nil
}

// errText renders an error like C's %m: the errno text without Go's "op path:".
func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// gather reads one reseed's worth of bytes. An error means the source gave
// nothing this time; it is closed and reopened at the next call.
func (s *entropySource) gather() ([]byte, error) {
	if s.kind == "" || s.done {
		return nil, nil
	}
	if s.file == nil && s.egd == nil {
		if err := s.open(); err != nil {
			return nil, err
		}
	}
	n := min(s.bytes, 255)
	switch s.kind {
	case "dev":
		buf := make([]byte, n)
		got, err := readBounded(s.file, buf)
		if got <= 0 {
			if err == nil {
				err = io.EOF
			}
			s.file.Close()
			s.file = nil
			return nil, fmt.Errorf("cannot read from entropy device %s: %s", s.path, errText(err))
		}
		return buf[:got], nil
	case "egd":
		buf, err := s.egdRead(n)
		if err != nil {
			s.egd.Close()
			s.egd = nil
			return nil, fmt.Errorf("lost connection to EGD server %s: %s", s.path, errText(err))
		}
		return buf, nil
	default: // a plain file, read once from the start, as Postfix does
		defer func() { s.file.Close(); s.file = nil; s.done = true }()
		if _, err := s.file.Seek(0, io.SeekStart); err != nil && !errors.Is(err, syscall.ESPIPE) {
			return nil, fmt.Errorf("cannot read from entropy file %s: %s", s.path, errText(err))
		}
		buf := make([]byte, s.bytes)
		got := 0
		deadline := time.Now().Add(sourceTimeout)
		for got < len(buf) {
			s.file.SetReadDeadline(deadline)
			k, err := s.file.Read(buf[got:])
			got += k
			if err == io.EOF || k == 0 && err == nil {
				break
			}
			if err != nil {
				return buf[:got], fmt.Errorf("cannot read from entropy file %s: %s", s.path, errText(err))
			}
		}
		return buf[:got], nil
	}
}

// readBounded reads once from a source opened O_NONBLOCK, waiting at most
// sourceTimeout: through the poller for what it can wait on (a FIFO, most
// devices), not at all for the rest, whose read returns at once. No
// goroutine is left behind, and a source that times out is closed.
func readBounded(f *os.File, buf []byte) (int, error) {
	f.SetReadDeadline(time.Now().Add(sourceTimeout)) // ErrNoDeadline: the read does not wait
	n, err := f.Read(buf)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = errors.New("timeout")
	}
	return n, err
}

// egdRead speaks the EGD protocol: 0x01 N, then a count byte and that many bytes.
func (s *entropySource) egdRead(n int) ([]byte, error) {
	s.egd.SetDeadline(time.Now().Add(sourceTimeout))
	if _, err := s.egd.Write([]byte{0x01, byte(n)}); err != nil {
		return nil, err
	}
	var count [1]byte
	if _, err := io.ReadFull(s.egd, count[:]); err != nil {
		return nil, err
	}
	if count[0] == 0 {
		return nil, errors.New("the EGD server has no entropy")
	}
	buf := make([]byte, count[0])
	if _, err := io.ReadFull(s.egd, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// exchangeFile is tls_random_exchange_name, opened before chroot as
// mail_owner (see files.go).
type exchangeFile struct {
	mu   sync.Mutex
	path string
	uid  int // mail_owner's, whom the file must belong to
	file *os.File
	gone bool // removed under us while chrooted: nothing left to save
}

// openExchangeFile opens the file, or creates it already holding 1024
// bytes from the pool; one that is a link, not regular, not mail_owner's
// or hard-linked is refused with a warning and replaced. The caller runs
// it with mail_owner's effective uid and gid.
func openExchangeFile(path string, uid int, p *pool) (*exchangeFile, error) {
	fresh := func() []byte {
		b := make([]byte, exchangeFileSize)
		p.read(b)
		return b
	}
	f, err := openOrCreateDataFile(path, "PRNG exchange file", uid, fresh, nil)
	if err != nil {
		return nil, fmt.Errorf("tls_prng_exch_open: cannot open PRNG exchange file %s: %s", path, errText(err))
	}
	return &exchangeFile{path: path, uid: uid, file: f}, nil
}

// removed reports a file that was unlinked while we hold it open.
func (x *exchangeFile) removed() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(x.file.Fd()), &st); err != nil {
		return true
	}
	return st.Nlink == 0
}

// reopen replaces a removed file by name; only possible outside a chroot.
func (x *exchangeFile) reopen(p *pool) error {
	nx, err := openExchangeFile(x.path, x.uid, p)
	if err != nil {
		return err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.file.Close()
	x.file = nx.file
	return nil
}

// forget marks the file as removed for good: exit saves nothing.
func (x *exchangeFile) forget() {
	x.mu.Lock()
	x.gone = true
	x.mu.Unlock()
}

// exchangeLockWait bounds the wait for the exchange file's lock: another
// tlsmgr holds it for microseconds; a process that holds it longer only
// costs the update, never a start or an exit.
const exchangeLockWait = time.Second

// lockBounded takes an exclusive flock, waiting at most wait.
func lockBounded(fd int, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EWOULDBLOCK && err != syscall.EINTR {
			return err
		}
		if !time.Now().Before(deadline) {
			return errors.New("another process holds its lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// update reads what is there into the pool and writes 1024 fresh bytes,
// under an exclusive flock so that concurrent tlsmgr processes take turns.
// A longer file is cut to 1024 bytes, so that it is always that size.
func (x *exchangeFile) update(p *pool) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.gone {
		return nil
	}
	fd := int(x.file.Fd())
	if err := lockBounded(fd, exchangeLockWait); err != nil {
		return fmt.Errorf("cannot lock PRNG exchange file %s: %s; not updating it this time", x.path, errText(err))
	}
	defer syscall.Flock(fd, syscall.LOCK_UN)
	buf := make([]byte, exchangeFileSize)
	defer clear(buf)
	n, err := x.file.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return fmt.Errorf("cannot read PRNG exchange file %s: %s", x.path, errText(err))
	}
	if n > 0 {
		if err := p.mix(buf[:n]); err != nil {
			return fmt.Errorf("cannot update PRNG exchange file %s: %v", x.path, err)
		}
	}
	if err := p.read(buf); err != nil {
		return fmt.Errorf("cannot update PRNG exchange file %s: %v", x.path, err)
	}
	if _, err := x.file.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("cannot write PRNG exchange file %s: %s", x.path, errText(err))
	}
	if err := x.file.Truncate(exchangeFileSize); err != nil {
		return fmt.Errorf("cannot truncate PRNG exchange file %s: %s", x.path, errText(err))
	}
	return nil
}
