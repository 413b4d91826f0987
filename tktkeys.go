// Session-ticket keys (postfix-tlsmgr.md §3): their rules, and where they
// come from.
//
// A key issues tickets until its tout and decrypts them for another H =
// smtpd_tls_session_cache_timeout/2, as in Postfix. Keys come from one of
// three places, behind one seam (keySource):
//   - memory only, as in Postfix: a key is made when the current one stops
//     issuing, and two are held (current and previous);
//   - the kept SQLite database (tlsmgr_keep_ticket_keys, keyKeeper in
//     store.go): the same, and the pair is written down and restored at
//     start;
//   - the shared database (tlsmgr_shared_database, sharedKeys in
//     shared.go): keys belong to time slots of H seconds (slot k issues
//     from k*H until tout = (k+1)*H), the database holds one key per slot
//     for every host of a realm, and a background refresher keeps slots
//     k-1..k+1 here, so that no request waits for the database.
//
// SECURITY: keys leave the lock only as copies, and are wiped when they
// are dropped and at exit. Nothing that holds the lock waits for I/O.

package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"sort"
	"sync"
	"time"
)

const (
	ticketNameLen = 16
	ticketKeyLen  = 88 // sizeof(TLS_TICKET_KEY) on LP64
)

type ticketKey struct {
	name [ticketNameLen]byte
	bits [32]byte // cipher key; shorter ciphers use a prefix
	hmac [32]byte
	tout int64 // stop issuing tickets with this key at this UNIX time

	// The same rules on the monotonic clock (monoNow): a key issues
	// tickets until issueUntil and decrypts them until decryptUntil, so a
	// wall clock stepped back cannot make it live longer than its rules.
	issueUntil, decryptUntil time.Duration

	// slot is the key's time slot in a shared series (tout = (slot+1)*H);
	// -1 for a key of this process's own series.
	slot int64
	// shared: the shared database holds this key for its slot, so it is
	// the one every host of the realm issues with in that slot.
	shared bool
}

// marshal lays the key out as Postfix's struct TLS_TICKET_KEY on amd64.
func (k *ticketKey) marshal() [ticketKeyLen]byte {
	var b [ticketKeyLen]byte
	copy(b[0:16], k.name[:])
	copy(b[16:48], k.bits[:])
	copy(b[48:80], k.hmac[:])
	binary.LittleEndian.PutUint64(b[80:], uint64(k.tout))
	return b
}

func (k *ticketKey) wipe() { *k = ticketKey{} }

// keySource is where ticket keys go and come from besides this process's
// memory: the kept SQLite database (keyKeeper) or the shared database
// (sharedKeys). Kept keys come back through restore, shared ones through
// adopt.
type keySource interface {
	// made learns of every key this process makes, with every key held
	// then, newest first. It runs under the key lock: it only copies, and
	// must not block.
	made(held []*ticketKey)
}

// maxSlottedKeys bounds the keys a shared series holds: slots k-1..k+1,
// and keys this host made for a slot while the database was away, kept
// for their tickets after the database's key replaced them. Pruning to it
// happens before a key is added, never after, so the list may hold up to
// three more for a moment.
const maxSlottedKeys = 8

// ticketKeys holds the keys. They are handed out by value, copied under
// the lock, so that a rotation can wipe a retired key while a copy of it
// is being sent.
type ticketKeys struct {
	mu      sync.Mutex
	held    []*ticketKey // own series: [current, previous]; shared: by slot, newest first
	half    int64        // H; 0 when the smtpd cache timeout is 0
	slotted bool         // a shared series: keys belong to slots of H seconds
	rand    io.Reader
	now     func() time.Time     // the wall clock: tout is UNIX time
	mono    func() time.Duration // the monotonic clock
	source  keySource            // nil: memory only

	// With kept or shared keys, requests wait for them at start, until
	// restoreBy at the latest (a second after the start; it takes
	// milliseconds): a ticket issued before a restart must find its key,
	// and a key still issuing must not be replaced by a new one for want
	// of it. nil: no wait.
	restored     chan struct{}
	restoredOnce sync.Once
	restoreBy    time.Time
}

func newTicketKeys(smtpdTimeout int64, rand io.Reader) *ticketKeys {
	return &ticketKeys{half: smtpdTimeout / 2, rand: rand, now: time.Now, mono: monoNow}
}

// processStart is the origin of monoNow.
var processStart = time.Now()

// monoNow is the time since the process started, on the monotonic clock,
// which no change of the wall clock moves.
func monoNow() time.Duration { return time.Since(processStart) }

func (t *ticketKeys) disabled() bool { return t.half == 0 }

// awaitRestore makes requests wait for restore (or the first adopt), until
// by; it is set up before serving begins.
func (t *ticketKeys) awaitRestore(by time.Time) {
	t.restored, t.restoreBy = make(chan struct{}), by
}

// restoreDone releases the requests that wait for the kept keys.
func (t *ticketKeys) restoreDone() {
	if t.restored != nil {
		t.restoredOnce.Do(func() { close(t.restored) })
	}
}

func (t *ticketKeys) waitRestored() {
	if t.restored == nil {
		return
	}
	select {
	case <-t.restored:
		return
	default:
	}
	wait := time.Until(t.restoreBy)
	if wait <= 0 {
		return
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-t.restored:
	case <-timer.C:
	}
}

// current is the key that issues now, or nil (tests and the watchdog).
func (t *ticketKeys) current() *ticketKey {
	if len(t.held) == 0 {
		return nil
	}
	return t.held[0]
}

// slotOf is the shared series' slot of a UNIX time.
func (t *ticketKeys) slotOf(unix int64) int64 {
	s := unix / t.half
	if unix < 0 && unix%t.half != 0 {
		s--
	}
	return s
}

// newKey makes a key from the PRNG (name, cipher key, HMAC key, as
// Postfix draws them) that issues until tout.
func (t *ticketKeys) newKey(tout, now int64, mono time.Duration, slot int64) (*ticketKey, error) {
	k := &ticketKey{tout: tout, slot: slot}
	t.setDeadlines(k, now, mono)
	for _, part := range [][]byte{k.name[:], k.bits[:], k.hmac[:]} {
		if _, err := io.ReadFull(t.rand, part); err != nil {
			k.wipe()
			return nil, err
		}
	}
	return k, nil
}

// setDeadlines puts a key's tout rules on the monotonic clock.
func (t *ticketKeys) setDeadlines(k *ticketKey, now int64, mono time.Duration) {
	k.issueUntil = mono + time.Duration(k.tout-now)*time.Second
	k.decryptUntil = mono + time.Duration(k.tout+t.half-now)*time.Second
}

// issue returns the key that issues tickets now, making one when there is
// none. Own series: the current key until its tout, as Postfix does
// (timecmp(tout, now) <= 0), or until H - 1 seconds have passed on the
// monotonic clock. Shared series: the key of this slot, the database's
// when there is one. made says whether the key is new.
func (t *ticketKeys) issue() (key ticketKey, made bool, err error) {
	t.waitRestored()
	t.mu.Lock()
	defer t.mu.Unlock()
	now, mono := t.now().Unix(), t.mono()
	var k *ticketKey
	if t.slotted {
		slot := t.slotOf(now)
		if cur := t.forSlot(slot, func(k *ticketKey) bool { return k.tout > now && mono < k.issueUntil }); cur != nil {
			return *cur, false, nil
		}
		// No key for this slot yet (the database is away, or this host
		// is the first): one of ours, which the refresher publishes.
		if k, err = t.newKey((slot+1)*t.half, now, mono, slot); err != nil {
			return ticketKey{}, false, err
		}
		t.pruneSlotted(now, mono) // before: the new key must not be the one dropped
		t.held = append(t.held, k)
	} else {
		if cur := t.current(); cur != nil && cur.tout > now && mono < cur.issueUntil {
			return *cur, false, nil
		}
		if k, err = t.newKey(now+t.half-1, now, mono, -1); err != nil {
			return ticketKey{}, false, err
		}
		if len(t.held) == 2 {
			t.held[1].wipe() // the retired key
			t.held = t.held[:1]
		}
		t.held = append([]*ticketKey{k}, t.held...)
	}
	if t.source != nil {
		t.source.made(t.held)
	}
	return *k, true, nil
}

// forSlot is the key that issues in slot: the database's, or else one of
// this host's; with ok, only among the keys it accepts.
func (t *ticketKeys) forSlot(slot int64, ok func(*ticketKey) bool) *ticketKey {
	var local *ticketKey
	for _, k := range t.held {
		if k.slot != slot || (ok != nil && !ok(k)) {
			continue
		}
		if k.shared {
			return k
		}
		if local == nil {
			local = k
		}
	}
	return local
}

// pruneSlotted drops the keys that can no longer decrypt, orders the rest
// by slot (newest first, the database's first within a slot), and keeps
// at most maxSlottedKeys, dropping the oldest.
func (t *ticketKeys) pruneSlotted(now int64, mono time.Duration) {
	live := t.held[:0]
	for _, k := range t.held {
		if k.tout+t.half > now && mono < k.decryptUntil {
			live = append(live, k)
		} else {
			k.wipe()
		}
	}
	for i := len(live); i < len(t.held); i++ {
		t.held[i] = nil
	}
	sort.SliceStable(live, func(i, j int) bool {
		if live[i].slot != live[j].slot {
			return live[i].slot > live[j].slot
		}
		return live[i].shared && !live[j].shared
	})
	for len(live) > maxSlottedKeys {
		live[len(live)-1].wipe()
		live[len(live)-1] = nil
		live = live[:len(live)-1]
	}
	t.held = live
}

// restore takes back the keys a previous process kept, newest first,
// dropping any that can no longer decrypt: the T/2 rules go on as if
// there had been no restart. A key that would issue tickets beyond now +
// H cannot have been made by those rules on this clock: it is dropped,
// with a warning, and not used at all.
func (t *ticketKeys) restore(keys []ticketKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now, mono := t.now().Unix(), t.mono()
	var usable []*ticketKey
	for i := range keys {
		k := keys[i]
		keys[i].wipe()
		switch {
		case k.tout > now+t.half:
			msg.warn("kept session ticket key %x would issue tickets until %s, beyond now + smtpd_tls_session_cache_timeout/2; dropped it",
				k.name, time.Unix(k.tout, 0).UTC().Format(time.RFC3339))
		case k.tout+t.half > now && len(usable) < 2:
			k.slot = -1
			t.setDeadlines(&k, now, mono)
			usable = append(usable, &k)
			continue
		}
		k.wipe()
	}
	// Keys made in this process before the database was open come first:
	// the newest kept key becomes the previous one, so that its tickets
	// still decrypt.
	for _, k := range usable {
		if len(t.held) < 2 {
			t.held = append(t.held, k)
		} else {
			k.wipe()
		}
	}
}

// adopt takes the shared database's keys for their slots (shared.go): they
// become the keys that issue in those slots. A key this host made for one
// of those slots while the database was away stays, for its tickets, until
// it can no longer decrypt. The copies in keys are wiped.
func (t *ticketKeys) adopt(keys []ticketKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now, mono := t.now().Unix(), t.mono()
	slot := t.slotOf(now)
	for i := range keys {
		in := keys[i]
		keys[i].wipe()
		if in.slot < slot-1 || in.slot > slot+1 {
			in.wipe() // not a slot this host asked for
			continue
		}
		var same *ticketKey
		for _, k := range t.held {
			if k.name == in.name {
				same = k
			} else if k.slot == in.slot && k.shared {
				k.shared = false // the database lost it (emptied) and another host's won: decrypt only
			}
		}
		if same != nil {
			same.shared = true
			in.wipe()
			continue
		}
		k := in
		in.wipe()
		k.shared = true
		k.tout = (k.slot + 1) * t.half
		t.setDeadlines(&k, now, mono)
		t.held = append(t.held, &k)
	}
	t.pruneSlotted(now, mono)
}

// candidates are copies of the keys this host would have the database
// hold for slots from..to: the key held for each (the database's, or one
// of ours made while it was away), and, for a slot from issuing on (now
// and ahead) that has none, a fresh one, held from now on as this host's
// own: should a request need a key before the database has answered, it
// gets the one being published. The caller wipes the copies.
func (t *ticketKeys) candidates(from, to, issuing int64) ([]ticketKey, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now, mono := t.now().Unix(), t.mono()
	t.pruneSlotted(now, mono) // before: the new keys must not be the ones dropped
	var out []ticketKey
	for slot := from; slot <= to; slot++ {
		if k := t.forSlot(slot, nil); k != nil {
			out = append(out, *k)
			continue
		}
		if slot < issuing {
			continue
		}
		k, err := t.newKey((slot+1)*t.half, now, mono, slot)
		if err != nil {
			wipeKeys(out)
			return nil, err
		}
		t.held = append(t.held, k)
		out = append(out, *k)
	}
	return out, nil
}

// setSource connects the keys to where they are kept or shared, and hands
// it the keys held now: those restored, and any made before the database
// was open.
func (t *ticketKeys) setSource(src keySource) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.source = src
	if len(t.held) > 0 {
		src.made(t.held)
	}
}

// find returns the key with this name while it may still decrypt tickets,
// that is while tout + H > now, and for no longer than that on the
// monotonic clock.
func (t *ticketKeys) find(name []byte) (ticketKey, bool) {
	t.waitRestored()
	t.mu.Lock()
	defer t.mu.Unlock()
	now, mono := t.now().Unix(), t.mono()
	for _, k := range t.held {
		if bytes.Equal(k.name[:], name) {
			if k.tout+t.half > now && mono < k.decryptUntil {
				return *k, true
			}
			return ticketKey{}, false
		}
	}
	return ticketKey{}, false
}

// wipe forgets every key, at exit.
func (t *ticketKeys) wipe() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.wipeLocked()
}

// wipeAtExit is wipe for the exit path, which must not hang on the lock.
func (t *ticketKeys) wipeAtExit() {
	if lockSoon(&t.mu) {
		defer t.mu.Unlock()
	}
	t.wipeLocked()
}

func (t *ticketKeys) wipeLocked() {
	for i, k := range t.held {
		k.wipe()
		t.held[i] = nil
	}
	t.held = nil
}
