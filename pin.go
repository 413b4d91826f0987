// Handing SQLite the files we opened ourselves. SQLite opens a database,
// its -wal and its -shm by name, and by name only: a name in
// data_directory belongs to mail_owner, who can swap the file behind it
// between our checks and SQLite's open, and no name outside the jail can be
// opened after chroot. So tlsmgr opens and checks the three files itself
// in pre-init (files.go), and gives SQLite a made-up name under pinPrefix.
// SQLite's unix VFS makes every system call through a table that
// sqlite3_vfs.xSetSystemCall can change: here open(2) of a pinned name
// returns a duplicate of our descriptor, stat(2) and lstat(2) describe it,
// access(2) finds it, and unlink(2) empties it (the name is not ours to
// remove). No name under pinPrefix exists on disk, so no lookup of one ever
// reaches the file system, inside a chroot or outside it.
//
// SECURITY: what SQLite reads is, by construction, the inode that tlsmgr
// opened with O_NOFOLLOW and checked with fstat; there is nothing to race.
// With pinsOnly set (the daemon, once its files are pinned), SQLite may
// open nothing else: any other name is refused, so a bug or a hostile
// schema cannot make it open a file by name.

package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"modernc.org/libc"
	sqlite3 "modernc.org/sqlite/lib"
)

// pinPrefix is the root of the made-up names. "/" belongs to root, inside
// queue_directory as outside, so nobody else can make it exist.
const pinPrefix = "/.tlsmgr-pinned/"

// The C struct stat that SQLite's stat and lstat fill is the kernel's, as
// is syscall.Stat_t: the same size, and the fields SQLite reads at the
// same offsets (a build on a platform where they differ fails here).
var (
	_ [unsafe.Sizeof(syscall.Stat_t{}) - unsafe.Sizeof(sqlite3.Tstat{})]byte
	_ [unsafe.Sizeof(sqlite3.Tstat{}) - unsafe.Sizeof(syscall.Stat_t{})]byte
	_ [unsafe.Offsetof(syscall.Stat_t{}.Ino) - unsafe.Offsetof(sqlite3.Tstat{}.Fst_ino)]byte
	_ [unsafe.Offsetof(sqlite3.Tstat{}.Fst_ino) - unsafe.Offsetof(syscall.Stat_t{}.Ino)]byte
	_ [unsafe.Offsetof(syscall.Stat_t{}.Size) - unsafe.Offsetof(sqlite3.Tstat{}.Fst_size)]byte
	_ [unsafe.Offsetof(sqlite3.Tstat{}.Fst_size) - unsafe.Offsetof(syscall.Stat_t{}.Size)]byte
	_ [unsafe.Offsetof(syscall.Stat_t{}.Mode) - unsafe.Offsetof(sqlite3.Tstat{}.Fst_mode)]byte
	_ [unsafe.Offsetof(sqlite3.Tstat{}.Fst_mode) - unsafe.Offsetof(syscall.Stat_t{}.Mode)]byte
	_ [unsafe.Offsetof(syscall.Stat_t{}.Uid) - unsafe.Offsetof(sqlite3.Tstat{}.Fst_uid)]byte
	_ [unsafe.Offsetof(sqlite3.Tstat{}.Fst_uid) - unsafe.Offsetof(syscall.Stat_t{}.Uid)]byte
)

// pins is the process's table of pinned names.
var pins struct {
	mu    sync.Mutex
	files map[string]*os.File // made-up name -> our descriptor; nil: the name never exists
	next  int
	only  bool // refuse every name that is not pinned
}

// pinnedDB is one database's pinned files.
type pinnedDB struct {
	name  string // what SQLite opens
	names []string
}

// pinFiles pins a database, its -wal and its -shm, and makes its -journal
// a name that never exists (tlsmgr always runs in WAL mode, so a journal
// is never its own). It returns the name to give SQLite.
func pinFiles(db, wal, shm *os.File) *pinnedDB {
	pins.mu.Lock()
	defer pins.mu.Unlock()
	if pins.files == nil {
		pins.files = map[string]*os.File{}
	}
	pins.next++
	name := pinPrefix + strconv.Itoa(pins.next) + "/db"
	p := &pinnedDB{name: name}
	for suffix, f := range map[string]*os.File{"": db, "-wal": wal, "-shm": shm, "-journal": nil} {
		pins.files[name+suffix] = f
		p.names = append(p.names, name+suffix)
	}
	return p
}

// unpin forgets the names; SQLite must have closed every connection.
func (p *pinnedDB) unpin() {
	pins.mu.Lock()
	defer pins.mu.Unlock()
	for _, n := range p.names {
		delete(pins.files, n)
	}
}

// pinsOnly makes SQLite refuse every name that is not pinned.
func pinsOnly() {
	pins.mu.Lock()
	pins.only = true
	pins.mu.Unlock()
}

// lookupPin says what a name SQLite asks for is: pinned (f, true), a
// made-up name that does not exist (nil, true), or an ordinary name
// (nil, false) that SQLite may open unless only pins are allowed.
func lookupPin(zPath uintptr) (f *os.File, ours, refuse bool) {
	path := libc.GoString(zPath)
	pins.mu.Lock()
	defer pins.mu.Unlock()
	if strings.HasPrefix(path+"/", pinPrefix) {
		return pins.files[path], true, false
	}
	return nil, false, pins.only
}

func setErrno(tls *libc.TLS, errno syscall.Errno) int32 {
	*(*int32)(cPointer(libc.X__errno_location(tls))) = int32(errno)
	return -1
}

// SQLite's own implementations, called for names that are not pinned.
var sqliteSyscalls struct {
	open, access, stat, lstat, unlink, openDirectory uintptr
}

// The replacements. Go func values, kept in variables for the life of the
// process: SQLite holds pointers to them. Each answers for a pinned name
// (pinned), and passes any other name to SQLite's own, unless only pinned
// names may be opened.
var (
	pinOpen = func(tls *libc.TLS, zPath uintptr, flags, mode int32) int32 {
		if r, ours := pinned(tls, zPath, func(f *os.File) (int32, error) {
			fd, err := dupCloexec(int(f.Fd()))
			return int32(fd), err
		}); ours {
			return r
		}
		return (*(*func(*libc.TLS, uintptr, int32, int32) int32)(unsafe.Pointer(&sqliteSyscalls.open)))(tls, zPath, flags, mode)
	}
	pinAccess = func(tls *libc.TLS, zPath uintptr, mode int32) int32 {
		if r, ours := pinned(tls, zPath, func(*os.File) (int32, error) { return 0, nil }); ours {
			return r
		}
		return (*(*func(*libc.TLS, uintptr, int32) int32)(unsafe.Pointer(&sqliteSyscalls.access)))(tls, zPath, mode)
	}
	pinStat  = func(tls *libc.TLS, zPath, buf uintptr) int32 { return statPinned(tls, zPath, buf, sqliteSyscalls.stat) }
	pinLstat = func(tls *libc.TLS, zPath, buf uintptr) int32 {
		return statPinned(tls, zPath, buf, sqliteSyscalls.lstat)
	}
	// SQLite removes a -wal or -shm that it no longer needs: a pinned one
	// is emptied instead, which is the same to SQLite.
	pinUnlink = func(tls *libc.TLS, zPath uintptr) int32 {
		if r, ours := pinned(tls, zPath, func(f *os.File) (int32, error) { return 0, syscall.Ftruncate(int(f.Fd()), 0) }); ours {
			return r
		}
		return (*(*func(*libc.TLS, uintptr) int32)(unsafe.Pointer(&sqliteSyscalls.unlink)))(tls, zPath)
	}
	// A directory is opened only to sync it, which SQLite skips when it
	// cannot: tlsmgr never syncs, and pinned names have no directory.
	pinOpenDirectory = func(tls *libc.TLS, zPath, pFd uintptr) int32 {
		if _, ours, refuse := lookupPin(zPath); ours || refuse {
			return sqlite3.SQLITE_CANTOPEN
		}
		return (*(*func(*libc.TLS, uintptr, uintptr) int32)(unsafe.Pointer(&sqliteSyscalls.openDirectory)))(tls, zPath, pFd)
	}
)

func statPinned(tls *libc.TLS, zPath, buf, orig uintptr) int32 {
	if r, ours := pinned(tls, zPath, func(f *os.File) (int32, error) {
		return 0, syscall.Fstat(int(f.Fd()), (*syscall.Stat_t)(cPointer(buf)))
	}); ours {
		return r
	}
	return (*(*func(*libc.TLS, uintptr, uintptr) int32)(unsafe.Pointer(&orig)))(tls, zPath, buf)
}

// pinned runs do on the file that a pinned name stands for, and answers
// as the system call would: do's result, or -1 with errno. A made-up name
// that is not pinned does not exist; any other name is refused when only
// pinned names may be opened. ours is false when SQLite's own system call
// is to answer.
func pinned(tls *libc.TLS, zPath uintptr, do func(f *os.File) (int32, error)) (r int32, ours bool) {
	f, made, refuse := lookupPin(zPath)
	switch {
	case f != nil:
		r, err := do(f)
		if err != nil {
			return setErrno(tls, err.(syscall.Errno)), true
		}
		return r, true
	case made:
		return setErrno(tls, syscall.ENOENT), true
	case refuse:
		return setErrno(tls, syscall.EACCES), true
	}
	return 0, false
}

// cPointer is an address in SQLite's C memory, which Go's collector does
// not manage, as a pointer.
func cPointer(addr uintptr) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&addr)) }

// dupCloexec duplicates fd at 3 or above with close-on-exec, as SQLite's
// own open does.
func dupCloexec(fd int) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_DUPFD_CLOEXEC, 3)
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

// init installs the replacements in SQLite's unix VFS before any database
// is opened: the system call table is shared by every unix VFS, and
// changing it while a connection uses it would not be safe.
func init() {
	if err := installPins(); err != nil {
		panic(err) // a build whose SQLite cannot be pinned must not run
	}
}

func installPins() error {
	tls := libc.NewTLS()
	defer tls.Close()
	vfs := sqlite3.Xsqlite3_vfs_find(tls, 0) // initializes SQLite; the default is "unix"
	if vfs == 0 {
		return fmt.Errorf("SQLite has no default VFS")
	}
	v := (*sqlite3.Tsqlite3_vfs)(cPointer(vfs))
	if v.FiVersion < 3 || v.FxSetSystemCall == 0 || v.FxGetSystemCall == 0 {
		return fmt.Errorf("SQLite's default VFS cannot change its system calls")
	}
	get := *(*func(*libc.TLS, uintptr, uintptr) uintptr)(unsafe.Pointer(&v.FxGetSystemCall))
	set := *(*func(*libc.TLS, uintptr, uintptr, uintptr) int32)(unsafe.Pointer(&v.FxSetSystemCall))
	// SQLite seeds its own PRNG (WAL salts, never secrets) from
	// /dev/urandom by name on first use: do it now, while the name
	// resolves and before only pinned names may be opened.
	seed := tls.Alloc(16)
	sqlite3.Xsqlite3_randomness(tls, 16, seed)
	tls.Free(16)
	for _, sc := range []struct {
		name string
		orig *uintptr
		repl uintptr
	}{
		{"open", &sqliteSyscalls.open, *(*uintptr)(unsafe.Pointer(&pinOpen))},
		{"access", &sqliteSyscalls.access, *(*uintptr)(unsafe.Pointer(&pinAccess))},
		{"stat", &sqliteSyscalls.stat, *(*uintptr)(unsafe.Pointer(&pinStat))},
		{"lstat", &sqliteSyscalls.lstat, *(*uintptr)(unsafe.Pointer(&pinLstat))},
		{"unlink", &sqliteSyscalls.unlink, *(*uintptr)(unsafe.Pointer(&pinUnlink))},
		{"openDirectory", &sqliteSyscalls.openDirectory, *(*uintptr)(unsafe.Pointer(&pinOpenDirectory))},
	} {
		name, err := libc.CString(sc.name)
		if err != nil {
			return err
		}
		*sc.orig = get(tls, vfs, name)
		rc := set(tls, vfs, name, sc.repl)
		libc.Xfree(tls, name)
		if *sc.orig == 0 || rc != sqlite3.SQLITE_OK {
			return fmt.Errorf("SQLite's unix VFS has no system call %q to replace", sc.name)
		}
	}
	return nil
}
