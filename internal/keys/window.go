package keys

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-secure-stdlib/parseutil"
)

// The decrypt window (crypto-agility's retirement of old versions): a key keeps only its latest versions, by
// number or by age, able to decrypt and verify, and min_decryption_version advances by itself, with a history
// event, as rotations make new versions. It never passes a version used within the quiet period (one that
// decrypted or verified is relied on; one that encrypted or signed made what will be): the migration view shows
// what, and rewrap moves it. An operator who must go further raises min_decryption_version on keys/:name/config:
// that is the forced way.

// DefaultDecryptQuietPeriod is how long a version must have gone without decrypting or verifying before the window
// passes it, unless the key says otherwise.
const DefaultDecryptQuietPeriod = 7 * 24 * time.Hour

// windowRecheck is how soon a window held up by what cannot be judged (usage not counted long enough) is looked at
// again.
const windowRecheck = time.Hour

// HasDecryptWindow reports whether k's min_decryption_version advances by itself.
func (k *Key) HasDecryptWindow() bool {
	return k.DecryptWindowVersions > 0 || k.DecryptWindowPeriod > 0
}

// QuietPeriod is how long a version must not have decrypted or verified before the window passes it.
func (k *Key) QuietPeriod() time.Duration {
	if k.DecryptQuietPeriod > 0 {
		return k.DecryptQuietPeriod
	}
	return DefaultDecryptQuietPeriod
}

// DecryptWindowView is the window as keys/:name/config and the key read give it: a number of versions, a period,
// or "" for none.
func (k *Key) DecryptWindowView() string {
	switch {
	case k.DecryptWindowVersions > 0:
		return fmt.Sprint(k.DecryptWindowVersions)
	case k.DecryptWindowPeriod > 0:
		return k.DecryptWindowPeriod.String()
	}
	return ""
}

// windowTarget is the lowest version the window keeps at now, and when it is to be looked at again for the
// window's own sake (zero: at the next rotation). Versions below it are outside the window.
func (k *Key) windowTarget(now time.Time) (target int, next time.Time) {
	target = k.LatestVersion
	if k.DecryptWindowVersions > 0 {
		target = max(k.LatestVersion-k.DecryptWindowVersions+1, 1)
	}
	if k.DecryptWindowPeriod > 0 {
		// A version stays while it is the latest or was superseded less than the period ago.
		target = k.LatestVersion
		for v := k.LatestVersion - 1; v >= max(k.MinDecryptionVersion, 1); v-- {
			succ := k.Versions[v+1]
			if succ == nil || now.Sub(succ.CreatedAt) >= k.DecryptWindowPeriod {
				break
			}
			target = v
			if at := succ.CreatedAt.Add(k.DecryptWindowPeriod); next.IsZero() || at.Before(next) {
				next = at
			}
		}
	}
	return target, next
}

// advanceDecryptWindow raises min_decryption_version as far as k's window and its quiet period allow at now, given
// what each version did (VersionUses) and since when that is counted. It records the advance, and sets when the
// window is looked at next. A version whose use is not counted for at least the quiet period (analytics off, or
// counted only lately) is not passed: nobody can say it is unused.
func (tx *Tx) advanceDecryptWindow(now time.Time, uses map[int]VersionUse, countedFrom time.Time) {
	k := tx.Key
	if !k.HasDecryptWindow() {
		if !k.WindowCheckAt.IsZero() {
			k.WindowCheckAt = time.Time{}
			tx.Changed()
		}
		return
	}
	target, next := k.windowTarget(now)
	from, quiet := max(k.MinDecryptionVersion, 1), k.QuietPeriod()
	stop, held := target, ""
	for v := from; v < target; v++ {
		ver := k.Versions[v]
		if ver == nil || ver.State == StateDestroyed {
			continue
		}
		if countedFrom.IsZero() || now.Sub(countedFrom) < quiet {
			stop, held = v, fmt.Sprintf("version %d: its use has not been counted for a whole quiet period (%s; usage analytics off or begun lately)", v, quiet)
			next = earliest(next, now.Add(windowRecheck))
			break
		}
		// A version that decrypted or verified within the quiet period is relied on; one that encrypted or signed
		// within it made data that will be (a version just replaced).
		if last := later(uses[v].LastOpened, uses[v].LastMade); now.Sub(last) < quiet {
			stop, held = v, fmt.Sprintf("version %d was used at %s, within the quiet period (%s)", v, FormatTime(last), quiet)
			next = earliest(next, last.Add(quiet))
			break
		}
	}
	if stop > k.MinDecryptionVersion {
		before := k.MinDecryptionVersion
		k.MinDecryptionVersion = stop
		if k.MinEncryptionVersion != 0 && k.MinEncryptionVersion < stop {
			k.MinEncryptionVersion = stop
		}
		details := fmt.Sprintf("min_decryption_version %d → %d (decrypt_window %s)", before, stop, k.DecryptWindowView())
		if held != "" {
			details += "; held at " + held
		}
		tx.Record("decrypt_window_advanced", 0, "scheduled", details)
		tx.m.log.Info("decrypt window advanced", "key", k.Name, "min_decryption_version", stop, "held", held)
	} else if held != "" {
		tx.m.log.Debug("decrypt window held", "key", k.Name, "at", held)
	}
	if !next.Equal(k.WindowCheckAt) {
		k.WindowCheckAt = next
		tx.Changed()
	}
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// applyDecryptWindow sets the window and its quiet period from c; the periodic function looks at the window at once.
func (k *Key) applyDecryptWindow(c Settings) error {
	if c.DecryptWindow != nil {
		raw := strings.TrimSpace(*c.DecryptWindow)
		k.DecryptWindowVersions, k.DecryptWindowPeriod = 0, 0
		if n, err := strconv.Atoi(raw); err == nil {
			if n < 0 {
				return Callerf("decrypt_window must not be negative")
			}
			k.DecryptWindowVersions = n
		} else if raw != "" {
			d, err := parseutil.ParseDurationSecond(raw)
			if err != nil || d <= 0 {
				return Callerf("decrypt_window must be a number of versions (3) or a period (2160h, 90d), not %q", raw)
			}
			if d < MinAutoRotatePeriod {
				return Callerf("decrypt_window as a period must be at least %s", MinAutoRotatePeriod)
			}
			k.DecryptWindowPeriod = d
		}
	}
	if c.DecryptQuietPeriod != nil {
		if *c.DecryptQuietPeriod < 0 {
			return Callerf("decrypt_window_quiet_period must not be negative")
		}
		k.DecryptQuietPeriod = *c.DecryptQuietPeriod
	}
	k.WindowCheckAt = time.Time{}
	if k.HasDecryptWindow() && k.LatestVersion > 0 {
		k.WindowCheckAt = time.Now().UTC()
	}
	return nil
}
