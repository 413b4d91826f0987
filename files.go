// Files in data_directory: the PRNG exchange file, the session database
// with its -wal and -shm companions, and the lock that keeps one tlsmgr
// per database.
//
// SECURITY: data_directory belongs to mail_owner, so whoever controls that
// account can plant symbolic links, hard links or foreign files in it, and
// write anything into the files. As Postfix's tlsmgr does (set_eugid), we
// open these files in pre-init only while the effective uid and gid are
// mail_owner's, so a planted link reaches nothing that mail_owner could
// not reach anyway. We also never follow a symbolic link (O_NOFOLLOW),
// check with fstat that what we opened is a regular file of mail_owner's
// with one link, and set its mode through the descriptor. Nothing here
// changes an owner or a mode by name, and nothing here reads what a file
// holds: that is post-init's, once no uid is root's (main.go). SQLite is
// handed these descriptors, never the names (pin.go).

package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// setEUGID sets the effective uid and gid as Postfix's set_eugid does:
// back to root first, then the group (and, as root, only that group),
// then the user.
func setEUGID(uid, gid int) error {
	if os.Geteuid() != 0 {
		if err := syscall.Seteuid(0); err != nil {
			return fmt.Errorf("seteuid(0): %s", errText(err))
		}
	}
	if err := syscall.Setegid(gid); err != nil {
		return fmt.Errorf("setegid(%d): %s", gid, errText(err))
	}
	if os.Getuid() == 0 {
		if err := syscall.Setgroups([]int{gid}); err != nil {
			return fmt.Errorf("setgroups(1, &%d): %s", gid, errText(err))
		}
	}
	if uid != 0 {
		if err := syscall.Seteuid(uid); err != nil {
			return fmt.Errorf("seteuid(%d): %s", uid, errText(err))
		}
	}
	noCoreDumps() // a change of credentials made us dumpable again
	return nil
}

// asMailOwner runs open with the effective uid and gid of owner, then
// becomes root again for chroot and the final privilege drop. Without an
// owner (we are not root) it runs open as we are.
//
// It limits only what opening a name can reach. While open runs, and after
// it, the real and saved uids are still root's: a process that parsed a
// crafted file now could be made to take root back. So open may open and
// fstat files, never read what is in them; the reading waits for
// postJailInit, after enterJail has dropped every uid.
func asMailOwner(owner *mailOwner, open func() error) error {
	if owner == nil || !anyRoot() {
		return open()
	}
	if err := setEUGID(owner.uid, owner.gid); err != nil {
		return err
	}
	err := open()
	if rerr := setEUGID(0, 0); rerr != nil {
		msg.fatal("%v", rerr) // nothing after this could work as intended
	}
	return err
}

// fileOwnerUID is the uid that every data file must belong to.
func fileOwnerUID(owner *mailOwner) int {
	if owner != nil && anyRoot() {
		return owner.uid
	}
	return os.Geteuid()
}

// badFileError says why an existing data file was refused.
type badFileError struct{ path, why string }

func (e *badFileError) Error() string { return e.path + ": " + e.why }

// statProblem says what is wrong with a data file, or "": it must be a
// regular file of uid with links links (1, or 0 for an O_TMPFILE file that
// has no name yet).
func statProblem(st *syscall.Stat_t, uid int, links uint64) string {
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFREG:
		return "it is not a regular file"
	case int(st.Uid) != uid:
		return fmt.Sprintf("it is owned by uid %d, not by mail_owner (uid %d)", st.Uid, uid)
	case st.Nlink != links:
		return fmt.Sprintf("it has %d hard links", st.Nlink)
	}
	return ""
}

// checkDataFile checks an open data file and sets its mode to 0600
// through the descriptor; it says what is wrong, or "".
func checkDataFile(fd int, uid int, links uint64) string {
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return "fstat: " + errText(err)
	}
	if why := statProblem(&st, uid, links); why != "" {
		return why
	}
	if st.Mode&0o7777 != 0o600 {
		if err := syscall.Fchmod(fd, 0o600); err != nil {
			return "fchmod 0600: " + errText(err)
		}
	}
	return ""
}

// openDataFile opens an existing data file for reading and writing. A
// symbolic link, a file that is not regular, not mail_owner's or has more
// than one link is a *badFileError; a missing file is os.ErrNotExist.
func openDataFile(path string, uid int) (*os.File, error) {
	// O_NONBLOCK: a FIFO or device planted under this name must not block us.
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	switch {
	case err == syscall.ELOOP:
		return nil, &badFileError{path, "it is a symbolic link"}
	case err == syscall.ENXIO || err == syscall.EISDIR:
		return nil, &badFileError{path, "it is not a regular file"}
	case err != nil:
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if why := checkDataFile(fd, uid, 1); why != "" {
		syscall.Close(fd)
		return nil, &badFileError{path, why}
	}
	syscall.SetNonblock(fd, false)
	return os.NewFile(uintptr(fd), path), nil
}

// oTmpfile is Linux's O_TMPFILE (__O_TMPFILE | O_DIRECTORY); package
// syscall does not define it.
const oTmpfile = 0o20000000 | syscall.O_DIRECTORY

// createDataFile creates a new file with the given content. The name
// appears only once the content is written (an unnamed O_TMPFILE, then
// linkat), so a crash never leaves a half-written file; the name must not
// exist, as with O_EXCL.
func createDataFile(path string, uid int, content []byte) (*os.File, error) {
	fd, err := syscall.Open(filepath.Dir(path), oTmpfile|syscall.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		// File systems without O_TMPFILE: create the name at once.
		if fd, err = syscall.Open(path, syscall.O_RDWR|syscall.O_CREAT|syscall.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600); err != nil {
			return nil, &os.PathError{Op: "create", Path: path, Err: err}
		}
		return finishDataFile(fd, path, uid, content, false)
	}
	return finishDataFile(fd, path, uid, content, true)
}

func finishDataFile(fd int, path string, uid int, content []byte, unnamed bool) (*os.File, error) {
	f := os.NewFile(uintptr(fd), path)
	fail := func(op string, err error) (*os.File, error) {
		f.Close()
		if !unnamed {
			os.Remove(path)
		}
		return nil, &os.PathError{Op: op, Path: path, Err: err}
	}
	links := uint64(1)
	if unnamed {
		links = 0
	}
	if why := checkDataFile(fd, uid, links); why != "" {
		return fail("create", errors.New(why))
	}
	if len(content) > 0 {
		if _, err := f.WriteAt(content, 0); err != nil {
			return fail("write", err)
		}
	}
	if unnamed {
		if err := linkAt(fd, path); err != nil {
			return fail("link", err)
		}
	}
	return f, nil
}

// linkAt gives an O_TMPFILE file its name, through /proc/self/fd because
// linkat(AT_EMPTY_PATH) needs a capability that mail_owner lacks.
func linkAt(fd int, path string) error {
	const atFdcwd, atSymlinkFollow = -100, 0x400
	from, err := syscall.BytePtrFromString("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return err
	}
	to, err := syscall.BytePtrFromString(path)
	if err != nil {
		return err
	}
	fdcwd := atFdcwd
	_, _, errno := syscall.Syscall6(syscall.SYS_LINKAT, uintptr(fdcwd), uintptr(unsafe.Pointer(from)),
		uintptr(fdcwd), uintptr(unsafe.Pointer(to)), atSymlinkFollow, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// openOrCreateDataFile opens a data file that is meant to persist (the
// exchange file, the lock file), creating it with content() when it is
// missing. One that fails the checks is refused with one warning naming
// it and why, and replaced: removing a name in data_directory as
// mail_owner cannot harm what a planted link points to. mayReplace, when
// set, can veto that first.
func openOrCreateDataFile(path, what string, uid int, content func() []byte, mayReplace func() error) (*os.File, error) {
	f, err := openDataFile(path, uid)
	var bad *badFileError
	switch {
	case err == nil:
		return f, nil
	case errors.As(err, &bad):
		if mayReplace != nil {
			if err := mayReplace(); err != nil {
				return nil, err
			}
		}
		msg.warn("refusing %s %s: %s; replacing it", what, path, bad.why)
		if err := removeName(path); err != nil {
			return nil, err
		}
	case !errors.Is(err, os.ErrNotExist):
		return nil, err
	}
	return createDataFile(path, uid, content())
}

// removeName removes one name from data_directory; a missing name is fine.
func removeName(path string) error {
	if err := syscall.Unlink(path); err != nil && err != syscall.ENOENT {
		return &os.PathError{Op: "remove", Path: path, Err: err}
	}
	return nil
}

// errDatabaseInUse is returned when another tlsmgr holds the database lock.
// The holder's pid is read from the lock file only after privileges are
// dropped (readHolder): it is a file that mail_owner can write.
type errDatabaseInUse struct {
	path string
	pid  string
	lock *os.File // the lock file, open for readHolder; nil when not known
}

// readHolder reads the pid that the lock file holds, for the message.
func (e *errDatabaseInUse) readHolder() {
	if e.lock == nil {
		return
	}
	var buf [16]byte
	n, _ := e.lock.ReadAt(buf[:], 0)
	e.lock.Close()
	e.lock = nil
	if pid := strings.TrimSpace(string(buf[:n])); pid != "" && strings.Trim(pid, "0123456789") == "" {
		e.pid = pid
	}
}

func (e *errDatabaseInUse) Error() string {
	holder := "another tlsmgr"
	if e.pid != "" {
		holder += " (pid " + e.pid + ")"
	}
	return fmt.Sprintf("session cache database %s is in use by %s", e.path, holder)
}

// lockDatabase takes the exclusive lock that makes one tlsmgr per database,
// waiting up to wait for a predecessor that is still shutting down (after
// "postfix reload" master starts the new tlsmgr while the old one exits).
// The lock is held until the file is closed or the process ends, however
// it ends. The file records our pid for the message a second daemon logs.
func lockDatabase(dbPath string, uid int, wait time.Duration) (*os.File, error) {
	path := dbPath + ".lock"
	// A wrong lock file is replaced, but never one that a live tlsmgr holds.
	notHeld := func() error {
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil // a link, or gone: nobody holds a lock through it
		}
		defer syscall.Close(fd)
		if syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB) == syscall.EWOULDBLOCK {
			return &errDatabaseInUse{path: dbPath}
		}
		return nil
	}
	f, err := openOrCreateDataFile(path, "lock file", uid, func() []byte { return nil }, notHeld)
	var inUse *errDatabaseInUse
	if errors.As(err, &inUse) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open lock file %s: %s", path, errText(err))
	}
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if err != syscall.EWOULDBLOCK {
			f.Close()
			return nil, &os.PathError{Op: "lock", Path: path, Err: err}
		}
		if !time.Now().Before(deadline) {
			return nil, &errDatabaseInUse{path: dbPath, lock: f}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}
