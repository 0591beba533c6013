# Helpers shared by the agent scripts (inspect, apply, rollback). scripts.py puts this text in
# front of each of them: a request carries one script, so they cannot be loaded from a file.
# Windows PowerShell 5.1; the contract is docs/agent-protocol.md. The workstation's users own
# their profile folders and registry: every path below a profile is checked for junctions,
# symbolic and hard links before the agent (an administrator) writes, deletes or sets an ACL.
Set-StrictMode -Version 2
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

function Get-Field($Object, [string]$Name) {
    # Strict mode makes a missing property an error, and a request may leave fields out.
    # Callers wrap list fields in @(): PowerShell unrolls an array returned from a function.
    # A request is parsed into dictionaries (JavaScriptSerializer, in the bootstrap).
    if ($null -eq $Object) { return $null }
    if ($Object -is [System.Collections.IDictionary]) {
        if ($Object.Contains($Name)) { return $Object[$Name] }
        return $null
    }
    $property = $Object.PSObject.Properties[$Name]
    if ($null -eq $property) { return $null }
    return $property.Value
}

function New-AgentError([string]$Code, [string]$Message) {
    return [ordered]@{ code = $Code; message = $Message }
}

function New-AgentException([string]$Code, [string]$Message) {
    # Thrown for the failures the contract names, so one catch per item reports them all.
    $exception = [System.Exception]::new($Message)
    $exception.Data['agent_code'] = $Code
    return $exception
}

function Get-Win32Code($ErrorRecord) {
    # The Win32 error of the first IOException in the chain (.NET wraps them), or 0.
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        if ($exception -is [System.IO.IOException]) { return $exception.HResult -band 0xFFFF }
        $exception = $exception.InnerException
    }
    return 0
}

function ConvertTo-AgentError($ErrorRecord) {
    # .NET calls surface wrapped (MethodInvocationException and the like): the first exception
    # of the chain that says something precise decides the code.
    $exception = $ErrorRecord.Exception
    $code = 'internal'
    $message = $exception.GetBaseException().Message
    while ($null -ne $exception) {
        if ($exception.Data.Contains('agent_code')) {
            $code = [string]$exception.Data['agent_code']; $message = $exception.Message; break
        }
        if ($exception -is [System.UnauthorizedAccessException]) {
            $code = 'read-only'; $message = $exception.Message; break
        }
        if ($exception -is [System.IO.IOException]) {
            # The low word of the HRESULT is the Win32 error code.
            $win32 = $exception.HResult -band 0xFFFF
            # 32 sharing violation, 33 lock violation, 1175-1177 ReplaceFile could not swap the
            # files (another program held one): retry later. 112 disk full, 39 handle disk full.
            if (@(32, 33, 1175, 1176, 1177) -contains $win32) { $code = 'locked'; $message = $exception.Message; break }
            if ($win32 -eq 112 -or $win32 -eq 39) { $code = 'disk-full'; $message = $exception.Message; break }
        }
        $exception = $exception.InnerException
    }
    # One line: the controller shows it as is.
    $oneLine = ($message -replace '\s+', ' ').Trim()
    return New-AgentError $code $oneLine
}

function Get-Sha256([byte[]]$Bytes) {
    $sha = [System.Security.Cryptography.SHA256]::Create()
    try { $digest = $sha.ComputeHash($Bytes) } finally { $sha.Dispose() }
    return ([BitConverter]::ToString($digest) -replace '-', '').ToLowerInvariant()
}

# --- paths ----------------------------------------------------------------------------------

function Get-FullPathSafe([string]$Path) {
    # A plain absolute path, normalised as Windows resolves it (GetFullPath drops trailing dots
    # and spaces and folds '..'); device paths, drive-relative forms and streams are refused.
    $refusal = "'{0}' is not a plain absolute path." -f $Path
    if ([string]::IsNullOrEmpty($Path) -or $Path.StartsWith('\\?\') -or $Path.StartsWith('\\.\')) {
        throw (New-AgentException 'unsafe-path' $refusal)
    }
    if (-not ($Path -match '^[A-Za-z]:\\' -or $Path -match '^\\\\[^\\]+\\[^\\]+')) {
        throw (New-AgentException 'unsafe-path' $refusal)
    }
    try { $full = [IO.Path]::GetFullPath($Path) } catch { throw (New-AgentException 'unsafe-path' $refusal) }
    if ($full.Length -gt 3) { $full = $full.TrimEnd('\') }
    return $full
}

function Test-Within([string]$Path, [string]$Folder) {
    # Case-insensitive and by whole components: C:\Users\al is not within C:\Users\a.
    $inner = $Path.TrimEnd('\'); $outer = $Folder.TrimEnd('\')
    return $inner.Equals($outer, [StringComparison]::OrdinalIgnoreCase) -or
        $inner.StartsWith($outer + '\', [StringComparison]::OrdinalIgnoreCase)
}

function Expand-Variables([string]$Text, $Variables) {
    $expanded = $Text
    foreach ($name in @($Variables.Keys)) {
        $pattern = '%' + [regex]::Escape($name) + '%'
        $expanded = $expanded -replace $pattern, ([string]$Variables[$name]).Replace('$', '$$')
    }
    return $expanded
}

function Get-MachineVariables {
    $variables = @{}
    foreach ($name in 'SystemDrive', 'SystemRoot', 'windir', 'ProgramData', 'ALLUSERSPROFILE', 'PUBLIC', 'ProgramFiles', 'ProgramFiles(x86)') {
        $value = [Environment]::GetEnvironmentVariable($name)
        if (-not [string]::IsNullOrEmpty($value)) { $variables[$name] = $value }
    }
    return $variables
}

function Get-ProfilePath([string]$Sid) {
    # From ProfileList, never from this session's environment, which is the WinRM account's.
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, [Microsoft.Win32.RegistryView]::Default)
    try {
        $key = $base.OpenSubKey('SOFTWARE\Microsoft\Windows NT\CurrentVersion\ProfileList\' + $Sid)
        if ($null -eq $key) { return $null }
        try { $value = $key.GetValue('ProfileImagePath') } finally { $key.Dispose() }
    } finally { $base.Dispose() }
    if ($null -eq $value -or [string]::IsNullOrEmpty([string]$value)) { return $null }
    return [string]$value
}

function Get-AccountVariables([string]$Sid, [string]$ProfilePath) {
    # %USERNAME%, %USERDOMAIN% and %USERPROFILE% of an account, for the allowed AppData roots.
    $variables = Get-MachineVariables
    try {
        $account = [System.Security.Principal.SecurityIdentifier]::new($Sid).Translate([System.Security.Principal.NTAccount]).Value
        $parts = $account.Split('\')
        if ($parts.Length -eq 2) { $variables['USERDOMAIN'] = $parts[0]; $variables['USERNAME'] = $parts[1] }
    } catch { }
    if (-not [string]::IsNullOrEmpty($ProfilePath)) { $variables['USERPROFILE'] = $ProfilePath }
    return $variables
}

function Expand-AppDataRoots($Roots, $Variables) {
    # The inventory's microsip.appdata_roots for one user; a root that stays unexpanded is dropped.
    foreach ($root in @($Roots)) {
        if ([string]::IsNullOrEmpty([string]$root)) { continue }
        $value = Expand-Variables ([string]$root) $Variables
        if ($value -match '%[^%\\]+%') { continue }
        try { Get-FullPathSafe $value } catch { }
    }
}

function Get-CheckStart([string]$Path, [string]$Sid, $Roots) {
    # Where the link check of a path begins: below the user's profile folder or an allowed
    # root when the path lies inside one, else below the root of its volume.
    $profilePath = $null
    if (-not [string]::IsNullOrEmpty($Sid)) { $profilePath = Get-ProfilePath $Sid }
    if ($null -ne $profilePath) {
        $profileFull = Get-FullPathSafe $profilePath
        if (Test-Within $Path $profileFull) { return $profileFull }
    }
    if (-not [string]::IsNullOrEmpty($Sid)) {
        foreach ($root in @(Expand-AppDataRoots $Roots (Get-AccountVariables $Sid $profilePath))) {
            if (-not (Test-Within $Path $root)) { continue }
            # The root is the user's own folder on the share: it may not be a link either.
            if ((Test-Link $root) -eq $true) {
                throw (New-AgentException 'unsafe-path' ("{0} is a junction or symbolic link; the agent never writes through one." -f $root))
            }
            return $root
        }
    }
    return [IO.Path]::GetPathRoot($Path)
}

function Test-Absent($ErrorRecord) {
    # Only a missing file or folder ends a walk quietly: access denied to the agent may be a
    # user hiding a link (they own their folders and may deny Administrators their attributes).
    $base = $ErrorRecord.Exception.GetBaseException()
    return ($base -is [System.IO.FileNotFoundException]) -or ($base -is [System.IO.DirectoryNotFoundException])
}

function Test-Link([string]$Path) {
    # $true for a junction or symbolic link, $false for anything else, $null when absent.
    # GetAttributes describes a link itself, not its target; attributes the agent may not read
    # are unsafe, not absent (a user may deny Administrators that on their own folders).
    try { $attributes = [IO.File]::GetAttributes($Path) } catch {
        if (Test-Absent $_) { return $null }
        throw (New-AgentException 'unsafe-path' ("cannot read the attributes of {0}: {1}" -f $Path, $_.Exception.GetBaseException().Message))
    }
    return [bool]($attributes -band [IO.FileAttributes]::ReparsePoint)
}

function Get-OtherNames([string]$Path) {
    # 'HardLink' when the file has other names, a link kind for a link, $null for a plain file.
    # The code method behind Get-Item's LinkType, called directly: the property swallows a
    # failure to open the file and would answer $null, a plain file.
    try {
        return [Microsoft.PowerShell.Commands.InternalSymbolicLinkLinkCodeMethods]::GetLinkType([IO.FileInfo]::new($Path))
    } catch {
        throw (New-AgentException 'unsafe-path' ("cannot tell whether {0} has other names: {1}" -f $Path, $_.Exception.GetBaseException().Message))
    }
}

function Assert-SafePath([string]$Path, [string]$Start) {
    # No existing component of the path below Start may be a junction or symbolic link, and
    # the file itself may have no other name: the agent would act on whatever they point to.
    # Called again right before each write, delete or ACL change: a user may swap a folder.
    $full = Get-FullPathSafe $Path
    $startFull = $Start
    if (-not (Test-Within $full $startFull)) {
        throw (New-AgentException 'unsafe-path' ("{0} is not under {1}." -f $full, $startFull))
    }
    $current = $startFull.TrimEnd('\')
    $relative = $full.Substring([Math]::Min($current.Length, $full.Length)).TrimStart('\')
    foreach ($name in $relative.Split('\')) {
        if ($name -eq '') { continue }
        $current = $current + '\' + $name
        $link = Test-Link $current
        if ($null -eq $link) { return }  # absent: nothing below exists
        if ($link) {
            throw (New-AgentException 'unsafe-path' ("{0} is a junction or symbolic link; the agent never writes through one." -f $current))
        }
    }
    if ([IO.File]::Exists($full) -and $null -ne (Get-OtherNames $full)) {
        throw (New-AgentException 'unsafe-path' ("{0} is a hard link to another file; the agent never writes through one." -f $full))
    }
}

function Get-ProfilesOfOthers([string]$Sid) {
    # Every profile folder of the machine but this user's (ProfileList), and the folder they
    # live in: a user's own file never lies in another user's profile.
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, [Microsoft.Win32.RegistryView]::Default)
    try {
        $list = $base.OpenSubKey('SOFTWARE\Microsoft\Windows NT\CurrentVersion\ProfileList')
        if ($null -eq $list) { return }
        try {
            foreach ($name in $list.GetSubKeyNames()) {
                if ($name -eq $Sid) { continue }
                $key = $list.OpenSubKey($name)
                if ($null -eq $key) { continue }
                try { $value = $key.GetValue('ProfileImagePath') } finally { $key.Dispose() }
                if ($null -ne $value -and -not [string]::IsNullOrEmpty([string]$value)) {
                    try { Get-FullPathSafe ([Environment]::ExpandEnvironmentVariables([string]$value)) } catch { }
                }
            }
        } finally { $list.Dispose() }
    } finally { $base.Dispose() }
}

function Assert-OwnPath([string]$Path, [string]$Sid) {
    # A user's ini (installed in their AppData, or portable next to an exe found for them) must
    # not lie in another user's profile: the user chooses their own HKCU and shell folders.
    foreach ($other in @(Get-ProfilesOfOthers $Sid)) {
        if (Test-Within $Path $other) {
            throw (New-AgentException 'unsafe-path' ("{0} lies in the profile {1} of another user." -f $Path, $other))
        }
    }
}

# --- ACLs -----------------------------------------------------------------------------------

function New-Acl([string]$Kind, [string]$Sid, [bool]$Folder) {
    # Explicit rules with inheritance cut, so the defaults of the profile or of Program Files
    # never widen access to the file (MicroSIP keeps passwords in it). The state (merge base,
    # backups with old passwords) is for SYSTEM and Administrators only.
    if ($Folder) {
        $acl = [System.Security.AccessControl.DirectorySecurity]::new()
        $inherit = [System.Security.AccessControl.InheritanceFlags]'ContainerInherit, ObjectInherit'
    } else {
        $acl = [System.Security.AccessControl.FileSecurity]::new()
        $inherit = [System.Security.AccessControl.InheritanceFlags]::None
    }
    $acl.SetAccessRuleProtection($true, $false)
    $rights = [ordered]@{ 'S-1-5-18' = 'FullControl'; 'S-1-5-32-544' = 'FullControl' }
    if ($Kind -eq 'microsip') { $rights[$Sid] = 'FullControl' }
    elseif ($Kind -eq 'override') { $rights['S-1-5-32-545'] = 'ReadAndExecute' }
    foreach ($account in $rights.Keys) {
        $rule = [System.Security.AccessControl.FileSystemAccessRule]::new(
            [System.Security.Principal.SecurityIdentifier]::new($account),
            [System.Security.AccessControl.FileSystemRights]($rights[$account]),
            $inherit,
            [System.Security.AccessControl.PropagationFlags]::None,
            [System.Security.AccessControl.AccessControlType]::Allow)
        $acl.AddAccessRule($rule)
    }
    return $acl
}

function Get-DaclText($Security) {
    # The protection flag and the entries, in a fixed order: Windows may add flags (AI) and
    # reorder entries it stores.
    $sddl = $Security.GetSecurityDescriptorSddlForm([System.Security.AccessControl.AccessControlSections]::Access)
    $protected = $sddl -match '^D:[A-Z]*P'
    $aces = [System.Collections.Generic.List[string]]::new()
    foreach ($match in [regex]::Matches($sddl, '\([^)]*\)')) { $aces.Add($match.Value) }
    $aces.Sort([StringComparer]::Ordinal)
    return ('{0}|{1}' -f $protected, ($aces -join ''))
}

# --- the agent's own state ------------------------------------------------------------------

function Get-StateRoot {
    return [IO.Path]::Combine([Environment]::GetFolderPath('CommonApplicationData'), 'MicroSIP-provisioner')
}

function Get-StateFolder([string]$Sid, [string]$Name) {
    # Keyed by the user's SID (the workstation's own files under 'machine'), never beside the
    # file: there the user could edit the merge base, read old backups or plant links.
    if ([string]::IsNullOrEmpty($Sid)) { return [IO.Path]::Combine((Get-StateRoot), 'machine', $Name) }
    return [IO.Path]::Combine((Get-StateRoot), 'users', $Sid, $Name)
}

function Test-StateRoot {
    # False when absent. Users may create folders in ProgramData and own them: a root that is a
    # link or is not owned by SYSTEM, Administrators or this account is refused.
    $root = Get-StateRoot
    $link = Test-Link $root
    if ($null -eq $link) { return $false }
    if ($link) {
        throw (New-AgentException 'unsafe-path' ("{0} is a junction or symbolic link; remove it." -f $root))
    }
    Assert-AgentOwned $root
    return $true
}

function Get-TrustedOwners {
    # Who owns what the agent creates: SYSTEM, Administrators or its own account. A standard
    # user owns what they create and cannot give it to any of these.
    return @('S-1-5-18', 'S-1-5-32-544', [System.Security.Principal.WindowsIdentity]::GetCurrent().User.Value)
}

function Assert-AgentOwned([string]$Folder) {
    # Users may create folders in ProgramData (and, below a root an administrator created
    # before the agent, wherever its inherited rules let them) and own what they create: an
    # owner can always grant themselves access to what the agent keeps there.
    $owner = [IO.Directory]::GetAccessControl($Folder, [System.Security.AccessControl.AccessControlSections]::Owner).GetOwner([System.Security.Principal.SecurityIdentifier]).Value
    if ((Get-TrustedOwners) -notcontains $owner) {
        throw (New-AgentException 'unsafe-path' ("{0} is owned by {1}, not by SYSTEM or Administrators: a user created it; remove it (rmdir /s /q) so that the agent can create its own." -f $Folder, $owner))
    }
}

function Open-StateFolder([string]$Folder) {
    $root = Get-StateRoot
    if (-not (Test-StateRoot)) {
        $null = [IO.Directory]::CreateDirectory($root, (New-Acl 'state' '' $true))
        $null = Test-StateRoot
    }
    [IO.Directory]::SetAccessControl($root, (New-Acl 'state' '' $true))
    # Checked before anything is created in them, and again after.
    foreach ($pass in 1, 2) {
        Assert-StateOwned $Folder
        if ($pass -eq 1) { $null = [IO.Directory]::CreateDirectory($Folder, (New-Acl 'state' '' $true)) }
    }
}

function Assert-StateOwned([string]$Folder) {
    # Every folder that exists from the state root down to $Folder: no link, owned by SYSTEM,
    # Administrators or the agent. What a user's own folder holds (a history, a backup) was
    # written by that user, whatever it says.
    $root = Get-StateRoot
    Assert-SafePath $Folder $root
    $current = $root
    foreach ($name in $Folder.Substring($root.Length).TrimStart('\').Split('\')) {
        $current = [IO.Path]::Combine($current, $name)
        if (-not [IO.Directory]::Exists($current)) { break }
        Assert-AgentOwned $current
    }
}

function Read-StateFile([string]$Folder, [string]$Item) {
    # What the agent reads of the state: nothing while the root does not exist. A folder a
    # user made first is theirs, and so is what it holds: refused before it is read.
    if (-not (Test-StateRoot)) { return $null }
    $path = [IO.Path]::Combine($Folder, $Item)
    Assert-StateOwned $Folder
    Assert-SafePath $path (Get-StateRoot)
    if (-not [IO.File]::Exists($path)) { return $null }
    return , [IO.File]::ReadAllBytes($path)
}

function Write-NewFile([string]$Path, [byte[]]$Bytes, $Acl) {
    # Created with its final ACL, so the content is never readable under the folder's defaults.
    $stream = [IO.File]::Create($Path, 4096, [IO.FileOptions]::None, $Acl)
    try {
        $stream.Write($Bytes, 0, $Bytes.Length)
        $stream.Flush($true)
    } finally {
        $stream.Dispose()
    }
}

function New-TempPath([string]$Folder, [string]$Name, [string]$Suffix) {
    # Same folder as the target: File.Replace and File.Move stay atomic only within a volume.
    $random = [Guid]::NewGuid().ToString('N').Substring(0, 12)
    return [IO.Path]::Combine($Folder, ('.{0}.{1}.{2}' -f $Name, $random, $Suffix))
}

function Move-FileOver([string]$Source, [string]$Target) {
    # .NET Framework's File.Move cannot overwrite; File.Replace can, in one step. Its backup
    # name must be a real null: PowerShell hands $null to a .NET string parameter as '', which
    # File.Replace refuses.
    if ([IO.File]::Exists($Target)) { [IO.File]::Replace($Source, $Target, [System.Management.Automation.Language.NullString]::Value) }
    else { [IO.File]::Move($Source, $Target) }
}

function Write-StateFile([string]$Folder, [string]$Item, [byte[]]$Bytes) {
    $target = [IO.Path]::Combine($Folder, $Item)
    $temp = New-TempPath $Folder $Item 'tmp'
    try {
        Write-NewFile $temp $Bytes (New-Acl 'state' '' $false)
        Move-FileOver $temp $target
    } finally {
        Remove-FileQuietly $temp
    }
}

function Move-BackupsUp([string]$Folder) {
    # backup.2 -> backup.1, backup.3 -> backup.2, once backup.1 has been used.
    foreach ($n in 2, 3) {
        $from = [IO.Path]::Combine($Folder, "backup.$n")
        if ([IO.File]::Exists($from)) { Move-FileOver $from ([IO.Path]::Combine($Folder, "backup.$($n - 1)")) }
    }
}

function Move-BackupsDown([string]$Folder) {
    # backup.new (the content an apply replaced) becomes backup.1, the others moving down only
    # as far as the first free slot (backup.3, the oldest, goes when all three are taken): an
    # interrupted rotation then resumes without loss. Nothing moves without a backup.new.
    $pending = [IO.Path]::Combine($Folder, 'backup.new')
    if (-not [IO.File]::Exists($pending)) { return }
    $backup1 = [IO.Path]::Combine($Folder, 'backup.1')
    $backup2 = [IO.Path]::Combine($Folder, 'backup.2')
    $free = 3
    if (-not [IO.File]::Exists($backup1)) { $free = 1 } elseif (-not [IO.File]::Exists($backup2)) { $free = 2 }
    if ($free -ge 3) { Move-FileOver $backup2 ([IO.Path]::Combine($Folder, 'backup.3')) }
    if ($free -ge 2) { Move-FileOver $backup1 $backup2 }
    Move-FileOver $pending $backup1
}

function Resolve-PendingBackup([string]$Folder, [string]$Path) {
    # A backup.new left by an agent that died. Written before its replace, it is the newest
    # generation once the file holds something else; while the file still holds the same
    # bytes the replace never happened, and it goes, with the record of its write.
    $pending = [IO.Path]::Combine($Folder, 'backup.new')
    if (-not [IO.File]::Exists($pending)) { return }
    $current = Read-HeldFile $Path
    if ($null -ne $current -and (Get-Sha256 ([IO.File]::ReadAllBytes($pending))) -eq (Get-Sha256 $current)) {
        Remove-UnmadeWrite $Folder (Get-Sha256 $current)
        [IO.File]::Delete($pending)
        return
    }
    Move-BackupsDown $Folder
}

# --- what each run wrote ---------------------------------------------------------------------
# 'history' in a file's state folder: one line per write of the tool, newest first, UTF-8,
# "<ticks>`t<run>`t<created|replaced>`t<SHA-256 of the content replaced, or ->`t<path>". It says
# what a rollback undoes, and in which order; it keeps no more lines than the backups can undo.

function ConvertFrom-WriteHistory([byte[]]$Bytes) {
    # The entries of a history, newest first; a line that does not parse ends it: ticks in
    # ASCII digits that fit a long, a run id as apply takes it, an action in lower case.
    $entries = [System.Collections.Generic.List[object]]::new()
    foreach ($line in [Text.Encoding]::UTF8.GetString($Bytes).Split("`n")) {
        $fields = $line.TrimEnd("`r").Split("`t")
        $ticks = [long]0
        if ($fields.Count -ne 5) { break }
        if (-not [long]::TryParse($fields[0], [Globalization.NumberStyles]::None, [Globalization.CultureInfo]::InvariantCulture, [ref]$ticks)) { break }
        if ($fields[1] -cnotmatch '^[0-9A-Za-z_-]{1,64}\z') { break }
        if (@('created', 'replaced') -cnotcontains $fields[2]) { break }
        $entries.Add([pscustomobject]@{ ticks = $ticks; run = $fields[1]; action = $fields[2]; before = $fields[3]; path = $fields[4] })
    }
    return , $entries
}

function Get-WriteHistory([string]$State) {
    # The history of one managed file; $null when it has none (an agent before this one).
    $bytes = Read-StateFile $State 'history'
    if ($null -eq $bytes) { return $null }
    return , (ConvertFrom-WriteHistory $bytes)
}

function Save-WriteHistory([string]$State, $Entries) {
    $text = [Text.StringBuilder]::new()
    foreach ($entry in $Entries) {
        $null = $text.Append(("{0}`t{1}`t{2}`t{3}`t{4}`r`n" -f $entry.ticks, $entry.run, $entry.action, $entry.before, $entry.path))
    }
    Write-StateFile $State 'history' ([Text.Encoding]::UTF8.GetBytes($text.ToString()))
}

function Add-WriteRecord([string]$State, [string]$Run, [string]$Before, [string]$Path, [bool]$UserMade) {
    # Before a write (apply, step 8): its line goes first. A write that creates the file ends
    # the history (nothing older can be undone past it), and only three replacements are kept,
    # as only three backups are. A write that replaces a file a user made ($UserMade) ends it
    # too: the user removed what the tool wrote and made their own, which nothing older
    # describes (a rollback must not take their file for one a run created).
    $history = Get-WriteHistory $State
    $ticks = [DateTime]::UtcNow.Ticks
    if ($null -ne $history -and $history.Count -gt 0 -and $history[0].ticks -ge $ticks) { $ticks = $history[0].ticks + 1 }
    $action = 'replaced'
    if ([string]::IsNullOrEmpty($Before)) { $action = 'created'; $Before = '-' }
    $kept = [System.Collections.Generic.List[object]]::new()
    $kept.Add([pscustomobject]@{ ticks = $ticks; run = $Run; action = $action; before = $Before; path = $Path })
    if ($action -ceq 'replaced' -and $null -ne $history -and -not $UserMade) {
        $replaced = 1
        foreach ($entry in $history) {
            if ($entry.action -ceq 'replaced') { $replaced++ }
            if ($replaced -gt 3) { break }
            $kept.Add($entry)
            if ($entry.action -ceq 'created') { break }
        }
    }
    Save-WriteHistory $State $kept
}

function Restore-WriteHistory([string]$State, $Bytes) {
    # The history as it was before a write that failed and left the file as it was ($Bytes:
    # $null when there was none). Cleanup only, like Remove-FileQuietly.
    try {
        if ($null -eq $Bytes) { Remove-FileQuietly ([IO.Path]::Combine($State, 'history')) }
        else { Write-StateFile $State 'history' $Bytes }
    } catch { }
}

function Remove-UnmadeWrite([string]$State, [string]$Content) {
    # The file holds again the content ($Content: its hash) the newest recorded write replaced:
    # that write never happened (its agent died before the replace, or the replace was put
    # back), and its record goes.
    $history = Get-WriteHistory $State
    if ($null -ne $history -and $history.Count -gt 0 -and $history[0].before -ceq $Content) { Remove-LastWrite $State }
}

function Remove-LastWrite([string]$State) {
    # The write a rollback undid leaves the history. An empty history stays: the backups left
    # must not pass for an older agent's.
    $history = Get-WriteHistory $State
    if ($null -eq $history) { return }
    $rest = [System.Collections.Generic.List[object]]::new()
    for ($index = 1; $index -lt $history.Count; $index++) { $rest.Add($history[$index]) }
    Save-WriteHistory $State $rest
}

function Remove-FileQuietly([string]$Path) {
    # Cleanup only: it must not hide the error that made it necessary.
    try { if ([IO.File]::Exists($Path)) { [IO.File]::Delete($Path) } } catch { }
}

function Remove-StaleFiles([string]$Folder, [string]$Name, [string[]]$Suffixes) {
    # .<name>.<12 hex>.tmp or .old left by an agent that died: either may hold a password.
    # Best effort; matched exactly, so no other file is touched.
    if (-not [IO.Directory]::Exists($Folder)) { return }
    $escaped = foreach ($suffix in $Suffixes) { [regex]::Escape($suffix) }
    $alternatives = @($escaped) -join '|'
    $pattern = '^\.' + [regex]::Escape($Name) + '\.[0-9a-f]{12}\.(' + $alternatives + ')$'
    try { $files = [IO.Directory]::GetFiles($Folder) } catch { return }
    foreach ($file in $files) {
        if ([IO.Path]::GetFileName($file) -match $pattern) { Remove-FileQuietly $file }
    }
}

function Get-LegacyFolder([string]$Path) {
    # Where agents before the ProgramData state kept it: beside the file, writable by its user.
    return [IO.Path]::Combine([IO.Path]::GetDirectoryName($Path), '.provisioner', [IO.Path]::GetFileName($Path))
}

function Test-PlainFile([string]$Path) {
    # A file that is neither a link nor one of several names of the same file.
    try { $attributes = [IO.File]::GetAttributes($Path) } catch { return $false }
    if ($attributes -band ([IO.FileAttributes]::ReparsePoint -bor [IO.FileAttributes]::Directory)) { return $false }
    try { return $null -eq (Get-OtherNames $Path) } catch { return $false }
}

# A folder that holds a file someone has open is not renamed (MS-FSA 2.1.5.14.11), and a folder
# that is not empty cannot become a junction: with a lock file of the agent's open in every
# folder below the start, a checked path stays as it was checked until the locks go.

function Lock-Folders([string]$Path, [string]$Start, $Locks) {
    # A lock file (SYSTEM and Administrators only, a random nonce, deleted when closed, even if
    # the agent dies) held open in each existing folder between $Start and the file's own, added
    # to $Locks; then the path is checked and every lock read back through its path: a folder
    # swapped while the locks were being taken does not hold its lock.
    Assert-SafePath $Path $Start
    if ($null -eq $Locks) { $Locks = [System.Collections.Generic.List[object]]::new() }
    $taken = @(foreach ($lock in $Locks) { [IO.Path]::GetDirectoryName($lock.path) })
    try {
        $folder = [IO.Path]::GetDirectoryName($Path)
        $relative = $folder.Substring([Math]::Min($Start.TrimEnd('\').Length, $folder.Length)).TrimStart('\')
        $current = $Start.TrimEnd('\')
        foreach ($name in $relative.Split('\')) {
            if ($name -eq '') { continue }
            $current = $current + '\' + $name
            if (-not [IO.Directory]::Exists($current)) { break }
            if ($taken -contains $current) { continue }
            $nonce = [Guid]::NewGuid().ToByteArray()
            $lockPath = New-TempPath $current 'microsip-provisioner' 'lock'
            try {
                $stream = [IO.FileStream]::new($lockPath, [IO.FileMode]::CreateNew, [System.Security.AccessControl.FileSystemRights]'Read, Write, Delete', [IO.FileShare]::Read, 4096, [IO.FileOptions]::DeleteOnClose, (New-Acl 'state' '' $false))
            } catch {
                $cause = ConvertTo-AgentError $_
                throw (New-AgentException $cause.code ('cannot lock {0}: {1}' -f $current, $cause.message))
            }
            $Locks.Add([pscustomobject]@{ path = $lockPath; stream = $stream; nonce = $nonce })
            $stream.Write($nonce, 0, $nonce.Length)
            $stream.Flush()
        }
        Assert-SafePath $Path $Start
        foreach ($lock in $Locks) {
            $seen = [byte[]]::new(16)
            $count = 0
            try {
                $reader = [IO.FileStream]::new($lock.path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]'ReadWrite, Delete')
                try { $count = $reader.Read($seen, 0, 16) } finally { $reader.Dispose() }
                $names = Get-OtherNames $lock.path
            } catch { $count = 0 }
            if ($count -ne 16 -or [Convert]::ToBase64String($seen) -ne [Convert]::ToBase64String($lock.nonce) -or $null -ne $names) {
                throw (New-AgentException 'unsafe-path' ("a folder on the path of {0} changed while the agent was locking it." -f $Path))
            }
        }
    } catch {
        Unlock-Folders $Locks
        throw
    }
    return , $Locks
}

function Unlock-Folders($Locks) {
    # Each lock file goes with its handle.
    if ($null -eq $Locks) { return }
    foreach ($lock in $Locks) { try { $lock.stream.Dispose() } catch { } }
    $Locks.Clear()
}

function Open-PlainFile([string]$Path) {
    # The file held open without sharing write or delete (its name cannot change meanwhile),
    # then checked to be no link and to have no other name: reads and ACL changes go through
    # this handle, never through the name again.
    $stream = [IO.FileStream]::new($Path, [IO.FileMode]::Open, [System.Security.AccessControl.FileSystemRights]'Read, ChangePermissions', [IO.FileShare]::Read, 4096, [IO.FileOptions]::None)
    try {
        if (([IO.File]::GetAttributes($Path) -band [IO.FileAttributes]::ReparsePoint) -or $null -ne (Get-OtherNames $Path)) {
            throw (New-AgentException 'unsafe-path' ("{0} is a link or has other names; the agent never acts through one." -f $Path))
        }
    } catch {
        $stream.Dispose()
        throw
    }
    return $stream
}

function Test-UserMade([string]$Path) {
    # Whether the file is owned by anybody but SYSTEM, Administrators or the agent: a user made
    # it (every write of the tool leaves it owned by Administrators). Read through a handle.
    $stream = Open-PlainFile $Path
    try {
        $owner = $stream.GetAccessControl().GetOwner([System.Security.Principal.SecurityIdentifier]).Value
    } finally {
        $stream.Dispose()
    }
    return (Get-TrustedOwners) -notcontains $owner
}

function Read-Stream($Stream) {
    $memory = [IO.MemoryStream]::new()
    $null = $Stream.Seek(0, [IO.SeekOrigin]::Begin)
    $Stream.CopyTo($memory)
    return , $memory.ToArray()
}

function Read-HeldFile([string]$Path) {
    # A file of a locked folder, read through a handle after its name is checked ($null: absent).
    if (-not [IO.File]::Exists($Path)) { return $null }
    $stream = Open-PlainFile $Path
    try { $bytes = Read-Stream $stream } finally { $stream.Dispose() }
    return , $bytes
}

function Read-CheckedFile([string]$Path, [string]$Start) {
    # The bytes of a file in a folder a user controls, read with its folders locked and itself
    # held; $null when absent, unsafe-path when a link is in the way.
    $locks = Lock-Folders $Path $Start $null
    try { $bytes = Read-HeldFile $Path } finally { Unlock-Folders $locks }
    if ($null -eq $bytes) { return $null }
    return , $bytes
}

function Read-UserFile([string]$Path, [string]$Start) {
    # Read-CheckedFile, or $null when unsafe.
    try { $bytes = Read-CheckedFile $Path $Start } catch { return $null }
    if ($null -eq $bytes) { return $null }
    return , $bytes
}

function Move-LegacyState([string]$Path, [string]$Start, [string]$StateFolder) {
    # Copies what the old .provisioner folder beside the file holds into the state folder, where
    # the state has none, then removes it. A folder that is a link is left alone; a file that is
    # a link or has other names is not read (its name is removed).
    $folder = Get-LegacyFolder $Path
    try { Assert-SafePath $folder $Start } catch { return }
    if (-not [IO.Directory]::Exists($folder)) { return }
    foreach ($item in 'applied', 'backup.1', 'backup.2', 'backup.3', 'backup.new', 'rolled-back') {
        $source = [IO.Path]::Combine($folder, $item)
        try { $attributes = [IO.File]::GetAttributes($source) } catch { continue }
        if ($attributes -band [IO.FileAttributes]::Directory) { continue }
        if (-not [IO.File]::Exists([IO.Path]::Combine($StateFolder, $item))) {
            $bytes = Read-UserFile $source $Start
            if ($null -ne $bytes) { Write-StateFile $StateFolder $item $bytes }
        }
        try { Assert-SafePath $folder $Start; [IO.File]::Delete($source) } catch { }
    }
    try { Assert-SafePath $folder $Start; Remove-StaleFiles $folder 'applied' @('tmp') } catch { }
    try { Assert-SafePath $folder $Start; [IO.Directory]::Delete($folder) } catch { }
    $container = [IO.Path]::GetDirectoryName($folder)
    try { if (@([IO.Directory]::GetFileSystemEntries($container)).Count -eq 0) { [IO.Directory]::Delete($container) } } catch { }
}

# --- processes ------------------------------------------------------------------------------

function Get-ProcessTable($Context, [string]$Image) {
    # One Win32_Process query per request and one GetOwnerSid per MicroSIP process: a query per
    # user asked every process's owner once per user (thousands of calls on an RDS host).
    # By owner SID, never by window: a MicroSIP in another session has no window this
    # non-interactive WinRM session can see (the reason microsip.exe /exit cannot work here).
    if ($null -ne $Context.processes -and $Context.image -eq $Image) { return $Context.processes }
    $rows = [System.Collections.Generic.List[object]]::new()
    $filter = "Name = '{0}'" -f $Image.Replace('\', '\\').Replace("'", "\'")
    foreach ($process in @(Get-CimInstance -ClassName Win32_Process -Filter $filter)) {
        $owner = $null
        try { $owner = Invoke-CimMethod -InputObject $process -MethodName GetOwnerSid } catch { $owner = $null }
        $sid = $null
        if ($null -ne $owner -and $owner.ReturnValue -eq 0) { $sid = [string]$owner.Sid }
        elseif ($null -eq (Get-Process -Id $process.ProcessId -ErrorAction SilentlyContinue)) { continue }
        $rows.Add([pscustomobject]@{ id = [int]$process.ProcessId; sid = $sid })
    }
    $Context.processes = $rows.ToArray()
    $Context.image = $Image
    return $Context.processes
}

function Get-OwnedProcessId($Context, [string]$Image, [string]$Sid) {
    foreach ($row in @(Get-ProcessTable $Context $Image)) {
        if ($null -eq $row.sid) {
            # Alive with an unknown owner: it may be the user's.
            throw (New-AgentException 'internal' ('cannot tell who owns process {0} ({1}).' -f $row.id, $Image))
        }
        if ($row.sid -eq $Sid) { $row.id }
    }
}

function Invoke-RunningPolicy($Checked, [string]$IfRunning, $Item, $Context) {
    # Returns $true when the file may be written. Called once the compare-and-swap passed, so a
    # conflict never stops anybody's MicroSIP. MicroSIP rewrites [Settings] from memory when it
    # exits, so a running instance would undo part of the push.
    if ($Checked.kind -ne 'microsip' -or [string]::IsNullOrEmpty($Checked.exe)) { return $true }
    $ids = @(Get-OwnedProcessId $Context $Checked.exe $Checked.sid)
    if ($ids.Count -eq 0 -or $IfRunning -eq 'force') { return $true }
    if ($IfRunning -eq 'stop') {
        foreach ($id in $ids) {
            # Killed, not closed: a normal exit would first save [Settings] over the new file.
            try { Stop-Process -Id $id -Force } catch {
                if ($null -ne (Get-Process -Id $id -ErrorAction SilentlyContinue)) { throw }
            }
        }
        $Item['stopped'] = $ids.Count
        $deadline = [DateTime]::UtcNow.AddSeconds(5)
        do {
            $Context.processes = $null
            if (@(Get-OwnedProcessId $Context $Checked.exe $Checked.sid).Count -eq 0) { return $true }
            Start-Sleep -Milliseconds 200
        } while ([DateTime]::UtcNow -lt $deadline)
        $text = '{0} still runs for this user 5 s after being stopped.' -f $Checked.exe
    } else {
        $text = '{0} is running for this user ({1} process(es)).' -f $Checked.exe, $ids.Count
    }
    $Item['status'] = 'busy'
    $Item['error'] = New-AgentError 'busy' $text
    return $false
}

# --- writing a managed file -----------------------------------------------------------------

function Test-FileRequest($File) {
    # The fields apply and rollback need before touching anything; returns them checked.
    $kind = [string](Get-Field $File 'kind')
    $path = [string](Get-Field $File 'path')
    $sid = [string](Get-Field $File 'sid')
    if ($kind -ne 'microsip' -and $kind -ne 'override') {
        throw (New-AgentException 'internal' ("unknown file kind '{0}'." -f $kind))
    }
    if ([string]::IsNullOrEmpty($path) -or -not [IO.Path]::IsPathRooted($path)) {
        throw (New-AgentException 'internal' ("the path '{0}' is not absolute." -f $path))
    }
    $path = Get-FullPathSafe $path
    if ($kind -eq 'microsip') {
        # Without the SID the ACL would lock the user out of their own file.
        if ([string]::IsNullOrEmpty($sid)) { throw (New-AgentException 'internal' 'a microsip file needs the user''s SID.') }
        $null = [System.Security.Principal.SecurityIdentifier]::new($sid)
    } else {
        $sid = ''
    }
    return [ordered]@{ kind = $kind; path = $path; sid = $sid; exe = [string](Get-Field $File 'process') }
}

function Initialize-ManagedFile($Checked, $Roots) {
    # Before anything is read or written: the path checked for links, the stale temp files of a
    # dead agent gone, the state folder opened and the old .provisioner state migrated, and a
    # backup.new left by an agent that died settled.
    # The folders stay locked until the caller's Unlock-Folders.
    $path = $Checked.path
    $start = Get-CheckStart $path $Checked.sid $Roots
    if ($Checked.kind -eq 'microsip') { Assert-OwnPath $path $Checked.sid }
    $locks = Lock-Folders $path $start $null
    try {
        $state = Get-StateFolder $Checked.sid ([IO.Path]::GetFileName($path))
        Open-StateFolder $state
        # A replace that died half-way (1177, then its recovery failed) left no file under its
        # name: its previous content is put back before anything else looks at the folder.
        Restore-Interrupted $Checked $state
        Remove-StaleFiles ([IO.Path]::GetDirectoryName($path)) ([IO.Path]::GetFileName($path)) @('tmp', 'old')
        Move-LegacyState $path $start $state
        foreach ($item in 'applied', 'backup.1', 'backup.2', 'backup.3', 'backup.new', 'rolled-back', 'history') {
            Remove-StaleFiles $state $item @('tmp')
        }
        Resolve-PendingBackup $state $path
        if ([IO.File]::Exists($path) -and ([IO.File]::GetAttributes($path) -band [IO.FileAttributes]::ReadOnly)) {
            throw (New-AgentException 'read-only' ('{0} has the read-only attribute.' -f $path))
        }
    } catch {
        Unlock-Folders $locks
        throw
    }
    return [ordered]@{ state = $state; start = $start; locks = $locks; replaced = $false }
}

function Restore-Interrupted($Checked, [string]$State) {
    # No file under its name, but the content it had waits as backup.new (written before every
    # replace of an existing file) or as the .old of a replace: put it back. The write that
    # replace was for did not happen, and its record goes.
    $path = $Checked.path
    if ([IO.File]::Exists($path)) { return }
    $pending = [IO.Path]::Combine($State, 'backup.new')
    $folder = [IO.Path]::GetDirectoryName($path)
    if ([IO.File]::Exists($pending)) {
        Restore-Previous $Checked $pending $true
        Remove-UnmadeWrite $State (Get-Sha256 ([IO.File]::ReadAllBytes($pending)))
        [IO.File]::Delete($pending)
        return
    }
    if (-not [IO.Directory]::Exists($folder)) { return }
    $pattern = '^\.' + [regex]::Escape([IO.Path]::GetFileName($path)) + '\.[0-9a-f]{12}\.old$'
    foreach ($file in [IO.Directory]::GetFiles($folder)) {
        if ([IO.Path]::GetFileName($file) -match $pattern -and (Test-PlainFile $file)) {
            [IO.File]::Move($file, $path)  # a rename inside the locked folder
            Remove-UnmadeWrite $State (Get-Sha256 (Read-HeldFile $path))
            return
        }
    }
}

function Invoke-ReplaceFile([string]$Temp, [string]$Path) {
    # ReplaceFile with a backup name beside the file: after error 1177 the old file is there
    # (with no backup name it would be under a name nobody knows), and is put back. Sharing
    # violations are retried for a second: antivirus, backup and indexer hold files briefly.
    $old = New-TempPath ([IO.Path]::GetDirectoryName($Path)) ([IO.Path]::GetFileName($Path)) 'old'
    for ($attempt = 1; $attempt -le 5; $attempt++) {
        try {
            [IO.File]::Replace($Temp, $Path, $old)
            break
        } catch {
            $failure = $_
            $win32 = Get-Win32Code $failure
            if ($win32 -eq 1177 -and -not [IO.File]::Exists($Path) -and [IO.File]::Exists($old)) {
                try { [IO.File]::Move($old, $Path) } catch {
                    # The previous content stays under the .old name; the next request puts it back.
                    throw (New-AgentException 'locked' ('the file could not be replaced (1177) nor put back yet; its previous content waits as {0}.' -f $old))
                }
            }
            if (($win32 -eq 32 -or $win32 -eq 33) -and $attempt -lt 5) { Start-Sleep -Milliseconds 200; continue }
            if (@(1175, 1176, 1177) -contains $win32) {
                $text = 'the file could not be replaced ({0}: {1}); the previous content is in place.' -f $win32, $failure.Exception.GetBaseException().Message
                throw (New-AgentException 'locked' $text)
            }
            throw
        }
    }
    Remove-FileQuietly $old
}

function Restore-Previous($Checked, $Backup, [bool]$HadFile) {
    # The file's previous content again (from a state file), or no file if there was none.
    if (-not $HadFile) { Remove-FileQuietly $Checked.path; return }
    if ($null -eq $Backup -or -not [IO.File]::Exists($Backup)) { return }
    $temp = New-TempPath ([IO.Path]::GetDirectoryName($Checked.path)) ([IO.Path]::GetFileName($Checked.path)) 'tmp'
    try {
        Write-NewFile $temp ([IO.File]::ReadAllBytes($Backup)) (New-Acl $Checked.kind $Checked.sid $false)
        if ([IO.File]::Exists($Checked.path)) { Invoke-ReplaceFile $temp $Checked.path } else { [IO.File]::Move($temp, $Checked.path) }
        $temp = $null
    } finally {
        if ($null -ne $temp) { Remove-FileQuietly $temp }
    }
}

function Write-ManagedFile($Checked, [byte[]]$Content, $Backup, $Prepared) {
    # The content replaces the file atomically, under its final ACL from first to last, and
    # the bytes read back are returned. ReplaceFile keeps the DACL of the file it replaces, so
    # the final one goes on the existing file first (if that fails, nothing is written), on the
    # temp file too (a first write moves it), and is checked after; a wrong one then puts the
    # previous content back from $Backup. Each goes through a handle on the file, in folders
    # held locked: a name swapped in between cannot redirect it.
    $path = $Checked.path
    $folder = [IO.Path]::GetDirectoryName($path)
    $acl = New-Acl $Checked.kind $Checked.sid $false
    $temp = $null
    try {
        if (-not [IO.Directory]::Exists($folder)) {
            # override.ini lives in the install folder: creating that would fake an installation.
            if ($Checked.kind -ne 'microsip') {
                throw (New-AgentException 'not-installed' ("the MicroSIP folder {0} does not exist." -f $folder))
            }
            $null = [IO.Directory]::CreateDirectory($folder, (New-Acl $Checked.kind $Checked.sid $true))
            $null = Lock-Folders $path $Prepared.start $Prepared.locks
        }
        $hadFile = [IO.File]::Exists($path)
        if ($hadFile) {
            $held = Open-PlainFile $path
            try { $held.SetAccessControl($acl) } finally { $held.Dispose() }
        }
        $temp = New-TempPath $folder ([IO.Path]::GetFileName($path)) 'tmp'
        Write-NewFile $temp $Content $acl
        if ($hadFile) { Invoke-ReplaceFile $temp $path } else { [IO.File]::Move($temp, $path) }
        $temp = $null
        $Prepared.replaced = $true
        $held = Open-PlainFile $path
        try {
            if ((Get-DaclText $held.GetAccessControl()) -ne (Get-DaclText $acl)) {
                try { $held.SetAccessControl($acl) } catch { }
                if ((Get-DaclText $held.GetAccessControl()) -ne (Get-DaclText $acl)) {
                    $held.Dispose()
                    Restore-Previous $Checked $Backup $hadFile
                    throw (New-AgentException 'acl-failed' "the file's permissions could not be set after the write; the previous content was put back.")
                }
            }
            $written = Read-Stream $held
        } finally {
            $held.Dispose()
        }
        return , $written
    } finally {
        if ($null -ne $temp) { Remove-FileQuietly $temp }
    }
}

# --- requests -------------------------------------------------------------------------------

function New-RefusalAnswer([string]$Op, [string]$Message) {
    return [ordered]@{ protocol = 1; op = $Op; ok = $false; error = (New-AgentError 'internal' $Message) }
}

function Test-Request($Request, [string]$Op) {
    # Returns a refusal answer, or $null when the request is for this script and version.
    $protocol = Get-Field $Request 'protocol'
    if ($protocol -ne 1) { return New-RefusalAnswer $Op ('protocol {0} not supported' -f $protocol) }
    $requested = Get-Field $Request 'op'
    if ($requested -ne $Op) { return New-RefusalAnswer $Op ("this script runs '{0}', not '{1}'" -f $Op, $requested) }
    return $null
}
# apply: write each file, independently and in order, so that it always holds either its old
# or its new content, with three backups and the merge base kept in the agent's state folder.
# The backups rotate only once the new content is in place and verified, so a failed write
# loses no generation. Each write is recorded in the file's history, with the request's run,
# before it happens: an agent that dies after the replace leaves the record of what it did.
$Request = $args[0]

function Invoke-PreparedApply($File, $Checked, [byte[]]$Content, [string]$Intended, $Prepared, $Item, [string]$IfRunning, $Context, [string]$Run) {
    # With the file's folders locked (Initialize-ManagedFile).
    $path = $Checked.path
    $state = $Prepared.state

    # Compare-and-swap: anything else than what inspect saw may be the user's own edit.
    $old = Read-HeldFile $path
    $current = $null
    if ($null -ne $old) { $current = Get-Sha256 $old }
    $Item['old_sha256'] = $current
    $expected = Get-Field $File 'expect_sha256'
    if ($current -ne $expected) {
        $Item['status'] = 'conflict'
        $Item['error'] = New-AgentError 'conflict' 'the file changed since inspect.'
        return
    }
    # Only now, when it will be written: a conflict must not stop anybody's MicroSIP.
    if (-not (Invoke-RunningPolicy $Checked $IfRunning $Item $Context)) { return }

    # A file a user made in place of the tool's: its history starts anew (Add-WriteRecord).
    $userMade = $false
    if ($null -ne $old) { $userMade = Test-UserMade $path }

    # The old content waits as backup.new (for SYSTEM and Administrators only): until the
    # new file is verified, no backup moves.
    $pending = [IO.Path]::Combine($state, 'backup.new')
    $backup = $null
    if ($null -ne $old) {
        Write-StateFile $state 'backup.new' $old
        $backup = $pending
    }
    $history = Read-StateFile $state 'history'
    try {
        Add-WriteRecord $state $Run $current $path $userMade
    } catch {
        if ($null -ne $backup) { Remove-FileQuietly $pending }
        throw
    }
    try {
        $writtenBytes = Write-ManagedFile $Checked $Content $backup $Prepared
    } catch {
        # Until the replace happened backup.new is no generation yet, nor the write a write of
        # its run; once it has, or while the file is missing (a replace that died half-way),
        # backup.new is the only copy of the old content and stays for the next request to
        # rotate in or put back (which then settles the record too).
        if (-not $Prepared.replaced -and [IO.File]::Exists($path) -eq ($null -ne $old)) {
            if ($null -ne $backup) { Remove-FileQuietly $pending }
            Restore-WriteHistory $state $history
        }
        throw
    }

    $written = Get-Sha256 $writtenBytes
    $Item['new_sha256'] = $written
    if ($written -ne $Intended) {
        Restore-Previous $Checked $backup ($null -ne $old)
        if ($null -ne $backup) { Remove-FileQuietly $pending; $undone = 'the previous file was put back' }
        else { $undone = 'it was removed' }
        Restore-WriteHistory $state $history
        throw (New-AgentException 'verify-failed' ('the file read back differs from the intended content; {0}.' -f $undone))
    }
    if ($null -ne $old) {
        # Written and verified: only now do the backups move. If that fails, backup.new
        # keeps the old content and the next apply or rollback rotates it in.
        try {
            Move-BackupsDown $state
            $Item['backup'] = [IO.Path]::Combine($state, 'backup.1')
        } catch {
            $Item['backup'] = $pending
        }
    }

    # The merge base of the next push, with passwords already replaced by the controller.
    $applied = Get-Field $File 'applied_b64'
    if ($null -ne $applied) {
        try {
            Write-StateFile $state 'applied' ([Convert]::FromBase64String([string]$applied))
        } catch {
            # The file itself is written: say so, or the controller would think nothing changed.
            $cause = ConvertTo-AgentError $_
            throw (New-AgentException $cause.code ('the file was written, but not its applied copy: ' + $cause.message))
        }
    }
    $Item['status'] = 'written'
}

function Invoke-ApplyFile($File, [string]$IfRunning, $Roots, $Context, [string]$Run) {
    $item = [ordered]@{
        path = (Get-Field $File 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    try {
        $checked = Test-FileRequest $File
        $encoded = Get-Field $File 'content_b64'
        $intended = Get-Field $File 'sha256'
        # Refused rather than guessed: a missing content would truncate the user's file.
        if ($null -eq $encoded -or [string]::IsNullOrEmpty($intended)) {
            throw (New-AgentException 'internal' 'the request gives no content_b64 or no sha256 for this file.')
        }
        $content = [Convert]::FromBase64String([string]$encoded)
        $prepared = Initialize-ManagedFile $checked $Roots
        try {
            Invoke-PreparedApply $File $checked $content $intended $prepared $item $IfRunning $Context $Run
        } finally {
            Unlock-Folders $prepared.locks
        }
    } catch {
        $item['status'] = 'error'
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'apply'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'apply' ("if_running '{0}' not supported" -f $ifRunning)
}
# The run this request belongs to (its writes are undone together); its own without one.
$run = [string](Get-Field $Request 'run')
if ([string]::IsNullOrEmpty($run)) { $run = [Guid]::NewGuid().ToString('N') }
if ($run -cnotmatch '^[0-9A-Za-z_-]{1,64}\z') {
    return New-RefusalAnswer 'apply' 'the run id must be 1 to 64 letters, digits, - or _'
}
$roots = @(Get-Field $Request 'appdata_roots')
$context = @{ processes = $null }

$files = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -ne $file) { $files.Add((Invoke-ApplyFile $file $ifRunning $roots $context $run)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'apply'; ok = $true; files = $files.ToArray() }
