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
# inspect: where MicroSIP and each user's ini are, and what they hold. Reads only.
$Request = $args[0]

function ConvertTo-FileState($Bytes) {
    if ($null -eq $Bytes) {
        return [ordered]@{ exists = $false; sha256 = $null; content_b64 = $null }
    }
    return [ordered]@{ exists = $true; sha256 = (Get-Sha256 $Bytes); content_b64 = [Convert]::ToBase64String($Bytes) }
}

function ConvertTo-AppliedState($Bytes, [bool]$Legacy) {
    if ($null -eq $Bytes) { return [ordered]@{ exists = $false; sha256 = $null; content_b64 = $null; legacy = $false } }
    return [ordered]@{ exists = $true; sha256 = (Get-Sha256 $Bytes); content_b64 = [Convert]::ToBase64String($Bytes); legacy = $Legacy }
}

function Test-ReadOnly([string]$Path) {
    if (-not [IO.File]::Exists($Path)) { return $false }
    return [bool]([IO.File]::GetAttributes($Path) -band [IO.FileAttributes]::ReadOnly)
}

function Get-RegistryText($Key, [string]$Name) {
    # The value as stored (REG_EXPAND_SZ not expanded), or $null.
    if ($null -eq $Key) { return $null }
    $value = $Key.GetValue($Name, $null, [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
    if ($null -eq $value) { return $null }
    return [string]$value
}

function Read-HiveValues($Root, [string]$Source) {
    # What the agent needs of a user's hive, through .NET keys closed at once: an open handle
    # would keep a hive loaded from a copy from unloading.
    $values = [ordered]@{ source = $Source; appdata = $null; microsip = $null; volatile = @{} }
    $key = $Root.OpenSubKey('Software\Microsoft\Windows\CurrentVersion\Explorer\User Shell Folders')
    try { $values.appdata = Get-RegistryText $key 'AppData' } finally { if ($null -ne $key) { $key.Dispose() } }
    $key = $Root.OpenSubKey('Software\MicroSIP')
    try { $values.microsip = Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
    $key = $Root.OpenSubKey('Volatile Environment')
    try {
        if ($null -ne $key) {
            foreach ($name in $key.GetValueNames()) {
                if (-not [string]::IsNullOrEmpty($name)) { $values.volatile[$name] = [string]$key.GetValue($name) }
            }
        }
    } finally { if ($null -ne $key) { $key.Dispose() } }
    return $values
}

function Invoke-Reg([string[]]$Arguments) {
    # reg.exe writes to stderr on failure; with ErrorActionPreference Stop that would throw
    # before its exit code could be read.
    $previous = $ErrorActionPreference
    $ErrorActionPreference = 'Continue'
    try { $output = @(& ([IO.Path]::Combine([Environment]::SystemDirectory, 'reg.exe')) $Arguments 2>&1) }
    finally { $ErrorActionPreference = $previous }
    if ($LASTEXITCODE -ne 0) {
        $text = ([string]::Join(' ', $output) -replace '\s+', ' ').Trim()
        throw (New-AgentException 'internal' ('reg {0} failed: {1}' -f $Arguments[0], $text))
    }
}

function Read-UserHive([string]$Sid, [string]$ProfilePath, [string]$Account) {
    # The user's own registry: HKU\<SID> while they are logged on. Logged off, a copy of their
    # NTUSER.DAT loaded under a name of ours (loading the file itself could make their next
    # logon fail). Never guessed: with AppData redirected, the local folder is a copy MicroSIP
    # does not read.
    $users = [Microsoft.Win32.Registry]::Users
    $loaded = $users.OpenSubKey($Sid)
    if ($null -ne $loaded) {
        try { return Read-HiveValues $loaded 'loaded' } finally { $loaded.Dispose() }
    }
    $hiveFile = [IO.Path]::Combine($ProfilePath, 'NTUSER.DAT')
    if (-not [IO.File]::Exists($hiveFile)) {
        throw (New-AgentException 'no-profile' ("{0} is logged off and their registry hive is not on this workstation (profile disk or roaming profile)." -f $Account))
    }
    $token = [Guid]::NewGuid().ToString('N')
    $temp = [IO.Path]::GetTempPath()
    $copy = [IO.Path]::Combine($temp, ('microsip-provisioner-{0}.dat' -f $token))
    $mount = 'MicroSIP-provisioner-' + $token
    try {
        # The hive with its transaction logs: a hive a crash left dirty needs them to load right.
        foreach ($suffix in '', '.LOG1', '.LOG2') {
            if ($suffix -ne '' -and -not [IO.File]::Exists($hiveFile + $suffix)) { continue }
            try {
                $source = [IO.FileStream]::new($hiveFile + $suffix, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]'ReadWrite, Delete')
            } catch {
                # Only a sharing violation passes (a logon or logoff); a DACL that denies the
                # agent (its owner may remove Administrators) stays until someone changes it.
                if (@(32, 33) -notcontains (Get-Win32Code $_)) {
                    throw (New-AgentException 'unsafe-path' ("cannot read the registry hive of {0}: {1}" -f $Account, $_.Exception.GetBaseException().Message))
                }
                throw (New-AgentException 'locked' ("The registry hive of {0} is in use (a logon or logoff is under way); try again." -f $Account))
            }
            try {
                $target = [IO.File]::Create($copy + $suffix)
                try { $source.CopyTo($target) } finally { $target.Dispose() }
            } finally { $source.Dispose() }
        }
        Invoke-Reg @('load', "HKU\$mount", $copy)
        try {
            $root = $users.OpenSubKey($mount)
            try { return Read-HiveValues $root 'offline' } finally { if ($null -ne $root) { $root.Dispose() } }
        } finally {
            Dismount-Hive $mount
        }
    } finally {
        Remove-HiveCopies $temp $token
    }
}

function Dismount-Hive([string]$Mount) {
    # Every handle to it closed first: one left open keeps the hive loaded until a reboot.
    for ($attempt = 1; $attempt -le 3; $attempt++) {
        [GC]::Collect(); [GC]::WaitForPendingFinalizers()
        try { Invoke-Reg @('unload', "HKU\$Mount"); return } catch {
            if ($attempt -eq 3) {
                throw (New-AgentException 'internal' ("could not unload the copy of a user's hive mounted as HKU\{0}: {1}" -f $Mount, $_.Exception.Message))
            }
            Start-Sleep -Milliseconds 200
        }
    }
}

function Remove-HiveCopies([string]$Folder, [string]$Token) {
    # The copies of users' hives: this request's, and any that an agent killed mid-way left
    # behind more than ten minutes ago (its mount unloaded first); a younger one may belong to
    # a request running now.
    $stale = [DateTime]::UtcNow.AddMinutes(-10)
    foreach ($leftover in @([IO.Directory]::GetFiles($Folder, 'microsip-provisioner-*.dat*'))) {
        $name = [IO.Path]::GetFileName($leftover)
        $mine = $name.StartsWith('microsip-provisioner-' + $Token)
        if (-not $mine -and [IO.File]::GetLastWriteTimeUtc($leftover) -gt $stale) { continue }
        $match = [regex]::Match($name, '^microsip-provisioner-([0-9a-f]{32})\.dat$')
        if (-not $mine -and $match.Success) {
            $mount = 'MicroSIP-provisioner-' + $match.Groups[1].Value
            $key = [Microsoft.Win32.Registry]::Users.OpenSubKey($mount)
            if ($null -ne $key) { $key.Dispose(); try { Dismount-Hive $mount } catch { } }
        }
        Remove-FileQuietly $leftover
    }
}

function Get-RoamingAppData($Hive, [string]$ProfilePath, [string]$Account) {
    $raw = $Hive.appdata
    if ([string]::IsNullOrEmpty($raw)) { $raw = '%USERPROFILE%\AppData\Roaming' }
    # Expanded with the target user's values: this session's own variables (USERPROFILE,
    # USERNAME, APPDATA) belong to the WinRM account and would point into its profile.
    $vars = @{ USERPROFILE = $ProfilePath }
    $parts = $Account.Split('\')
    if ($parts.Length -eq 2) { $vars['USERDOMAIN'] = $parts[0]; $vars['USERNAME'] = $parts[1] }
    foreach ($name in @($Hive.volatile.Keys)) { if (-not $vars.ContainsKey($name)) { $vars[$name] = $Hive.volatile[$name] } }
    $machine = Get-MachineVariables
    foreach ($name in @($machine.Keys)) { $vars[$name] = $machine[$name] }
    $expanded = Expand-Variables $raw $vars
    if ($expanded -match '%[^%\\]+%') {
        # Guessing would write an ini that MicroSIP never reads.
        throw (New-AgentException 'internal' ("cannot expand the AppData folder '{0}' for this user." -f $raw))
    }
    return $expanded
}

function Test-AppData([string]$AppData, [string]$ProfilePath, $Roots) {
    # The user writes their own User Shell Folders: their AppData is accepted only inside their
    # profile or under a redirection root the inventory allows. A share elsewhere is Folder
    # Redirection (reported); a local folder elsewhere may be another user's profile.
    try { $folder = Get-FullPathSafe $AppData } catch {
        throw (New-AgentException 'unsafe-path' ("the AppData folder '{0}' is not a plain absolute path." -f $AppData))
    }
    if (Test-Within $folder $ProfilePath) { return $folder }
    foreach ($root in @($Roots)) { if (Test-Within $folder $root) { return $folder } }
    if ($folder.StartsWith('\\')) {
        throw (New-AgentException 'redirected' ("AppData is redirected to {0}; MicroSIP reads its ini there. Allow that location with microsip.appdata_roots to write it." -f $folder))
    }
    throw (New-AgentException 'unsafe-path' ("AppData points to {0}, outside the profile {1}; set by the user, or a redirection to allow with microsip.appdata_roots." -f $folder, $ProfilePath))
}

function Get-ExeRegistryView([string]$ExePath) {
    # MicroSIP opens HKLM without KEY_WOW64_*: a 32-bit build reads the 32-bit view
    # (WOW6432Node). The PE header says which build this is.
    $view = [Microsoft.Win32.RegistryView]::Registry64
    try {
        $stream = [IO.File]::Open($ExePath, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
        try {
            $header = [byte[]]::new(1024)
            $count = $stream.Read($header, 0, $header.Length)
        } finally { $stream.Dispose() }
        if ($count -ge 64) {
            $pe = [BitConverter]::ToInt32($header, 60)
            if ($pe -gt 0 -and $pe + 6 -le $count -and $header[$pe] -eq 0x50 -and $header[$pe + 1] -eq 0x45) {
                if ([BitConverter]::ToUInt16($header, $pe + 4) -eq 0x14c) { $view = [Microsoft.Win32.RegistryView]::Registry32 }
            }
        }
    } catch { }
    return $view
}

function Get-ExeVersion([string]$ExePath) {
    # The FileVersion text of the exe's version resource, or $null. Whoever controls the file
    # wrote it (a per-user install is the user's): it is held open as a plain file (no link,
    # no other name) while read, and bounded; the controller parses it strictly.
    try {
        $held = Open-PlainFile $ExePath
        try { $text = [Diagnostics.FileVersionInfo]::GetVersionInfo($ExePath).FileVersion } finally { $held.Dispose() }
    } catch { return $null }
    if ($null -eq $text) { return $null }
    $text = [string]$text
    if ($text.Length -gt 64) { $text = $text.Substring(0, 64) }
    return $text
}

function Get-HklmMicroSip([string]$ExePath) {
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, (Get-ExeRegistryView $ExePath))
    try {
        $key = $base.OpenSubKey('SOFTWARE\MicroSIP')
        try { return Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
    } finally { $base.Dispose() }
}

function Get-MsiProducts([string]$Sid) {
    # What MsiEnumProducts lists for the user: per-machine products (S-1-5-18) and the user's own.
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, [Microsoft.Win32.RegistryView]::Registry64)
    try {
        foreach ($owner in @('S-1-5-18', $Sid)) {
            if ([string]::IsNullOrEmpty($owner)) { continue }
            $products = $base.OpenSubKey('SOFTWARE\Microsoft\Windows\CurrentVersion\Installer\UserData\' + $owner + '\Products')
            if ($null -eq $products) { continue }
            try {
                foreach ($name in $products.GetSubKeyNames()) {
                    $properties = $products.OpenSubKey($name + '\InstallProperties')
                    if ($null -eq $properties) { continue }
                    try {
                        [ordered]@{ name = [string](Get-RegistryText $properties 'DisplayName'); location = [string](Get-RegistryText $properties 'InstallLocation') }
                    } finally { $properties.Dispose() }
                }
            } finally { $products.Dispose() }
        }
    } finally { $base.Dispose() }
}

function Get-MicroSipMode($Hive, [string]$ExeDir, [string]$ExePath, [string]$Sid) {
    # MicroSIP 3.22.3's own rule (settings.cpp, AccountSettings::Init): the default value of
    # HKCU\Software\MicroSIP, else of HKLM\Software\MicroSIP; when that is empty or not the
    # exe's folder, the first MSI product named MicroSIP (its InstallLocation without a trailing
    # backslash, or the exe's folder when empty). Installed when the result equals the exe's
    # folder, compared case-insensitively and exactly.
    $hklm = Get-HklmMicroSip $ExePath
    $value = [string]$Hive.microsip; $rule = 'hkcu'
    if ([string]::IsNullOrEmpty($value)) { $value = [string]$hklm; $rule = 'hklm' }
    $detail = "HKCU='{0}' HKLM='{1}'" -f $Hive.microsip, $hklm
    if ([string]::IsNullOrEmpty($value) -or -not $value.Equals($ExeDir, [StringComparison]::OrdinalIgnoreCase)) {
        foreach ($product in @(Get-MsiProducts $Sid)) {
            if (-not $product.name.Equals('MicroSIP', [StringComparison]::OrdinalIgnoreCase)) { continue }
            if ([string]::IsNullOrEmpty($product.location)) { $value = $ExeDir; $rule = 'msi-any-location' }
            else { $value = $product.location.TrimEnd('\'); $rule = 'msi' }
            $detail += " MSI InstallLocation='{0}'" -f $product.location
            break
        }
    }
    if (-not [string]::IsNullOrEmpty($value) -and $value.Equals($ExeDir, [StringComparison]::OrdinalIgnoreCase)) {
        return [ordered]@{ mode = 'installed'; rule = $rule; detail = $detail }
    }
    return [ordered]@{ mode = 'portable'; rule = 'none'; detail = $detail }
}

function Find-MicroSip($Install) {
    # The inventory's folder if the exe is there, else the installer's markers: the default
    # value of HKLM\Software\MicroSIP (either registry view), then a per-machine MSI product.
    # A folder below a user's own variable (%LOCALAPPDATA%) is looked for per user.
    $exe = [string](Get-Field $Install 'exe')
    if ([string]::IsNullOrEmpty($exe)) { $exe = 'microsip.exe' }
    $candidates = @()
    $inventoryDir = [string](Get-Field $Install 'install_dir')
    if (-not [string]::IsNullOrEmpty($inventoryDir)) {
        $expanded = Expand-Variables $inventoryDir (Get-MachineVariables)
        if ($expanded -match '%[^%\\]+%') {
            return [ordered]@{ found = $true; dir = $null; exe_path = $null; source = 'inventory'; exe = $exe; per_user = $expanded }
        }
        $candidates += , [ordered]@{ source = 'inventory'; dir = $expanded }
    }
    foreach ($view in [Microsoft.Win32.RegistryView]::Registry64, [Microsoft.Win32.RegistryView]::Registry32) {
        $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, $view)
        try {
            $key = $base.OpenSubKey('SOFTWARE\MicroSIP')
            try { $dir = Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
        } finally { $base.Dispose() }
        if (-not [string]::IsNullOrEmpty($dir)) { $candidates += , [ordered]@{ source = 'registry'; dir = $dir } }
    }
    foreach ($product in @(Get-MsiProducts '')) {
        if ($product.name.Equals('MicroSIP', [StringComparison]::OrdinalIgnoreCase) -and -not [string]::IsNullOrEmpty($product.location)) {
            $candidates += , [ordered]@{ source = 'msi'; dir = $product.location }
        }
    }
    foreach ($candidate in $candidates) {
        $found = Find-ExeIn $candidate.dir $exe $candidate.source
        if ($null -ne $found) { return $found }
    }
    return [ordered]@{ found = $false; dir = $null; exe_path = $null; source = $null; exe = $exe; per_user = $null }
}

function Find-ExeIn([string]$Folder, [string]$Exe, [string]$Source) {
    $dir = $Folder.Trim().Trim('"').TrimEnd('\')
    try { $exePath = [IO.Path]::Combine($dir, $Exe) } catch { return $null }
    if (-not [IO.File]::Exists($exePath)) { return $null }
    return [ordered]@{ found = $true; dir = $dir; exe_path = $exePath; source = $Source; exe = $Exe; per_user = $null }
}

function Find-UserMicroSip($Install, $Hive, [string]$ProfilePath, [string]$AppData) {
    # A per-user folder expanded with the user's own variables; where the exe is not there, the
    # folder the user's own installer recorded (HKCU), then the machine's markers.
    if ($null -eq $Install.per_user) { return $Install }
    $vars = Get-MachineVariables
    $vars['USERPROFILE'] = $ProfilePath
    $vars['LOCALAPPDATA'] = [IO.Path]::Combine($ProfilePath, 'AppData', 'Local')
    $vars['APPDATA'] = $AppData
    $folder = Expand-Variables $Install.per_user $vars
    $candidates = @()
    if ($folder -notmatch '%[^%\\]+%') { $candidates += , [ordered]@{ source = 'inventory'; dir = $folder } }
    if (-not [string]::IsNullOrEmpty($Hive.microsip)) { $candidates += , [ordered]@{ source = 'hkcu'; dir = [string]$Hive.microsip } }
    foreach ($candidate in $candidates) {
        # The user writes their own HKCU and shell folders: only a local folder inside their
        # own profile is looked at (a share named there would make the agent's account
        # authenticate to a server of the user's choosing).
        $raw = [string]$candidate.dir
        try { $dir = Get-FullPathSafe ($raw.Trim().Trim('"')) } catch { continue }
        if ($dir.StartsWith('\\') -or -not (Test-Within $dir $ProfilePath)) { continue }
        # Nor one reached through a link: a junction to an object-manager link could still
        # lead to a share. Looked at with its folders locked.
        $locks = Lock-Folders ([IO.Path]::Combine($dir, $Install.exe)) $ProfilePath $null
        try { $found = Find-ExeIn $dir $Install.exe $candidate.source } finally { Unlock-Folders $locks }
        if ($null -ne $found) { return $found }
    }
    $machine = Find-MicroSip ([pscustomobject]@{ exe = $Install.exe })
    if ($machine.found) { return $machine }
    throw (New-AgentException 'not-installed' ("MicroSIP was not found in {0} for this user, nor by registry or MSI." -f $folder))
}

function Resolve-Account([string]$Account) {
    # NTAccount does not resolve '.': the local account '.\name' is '<COMPUTERNAME>\name'.
    $name = $Account
    if ($name.StartsWith('.\')) { $name = $env:COMPUTERNAME + $name.Substring(1) }
    try {
        return [System.Security.Principal.NTAccount]::new($name).Translate([System.Security.Principal.SecurityIdentifier])
    } catch {
        if ($_.Exception.GetBaseException() -is [System.Security.Principal.IdentityNotMappedException]) {
            throw (New-AgentException 'no-account' ("the Windows account {0} cannot be resolved to a SID." -f $Account))
        }
        throw
    }
}

function Get-UserState($User, $Install, [string]$Mode, $Roots, $Context) {
    $item = [ordered]@{
        name = (Get-Field $User 'name'); windows = (Get-Field $User 'windows')
        sid = $null; profile = $null; appdata = $null; path = $null
    }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $account = [string]$item.windows
        if ([string]::IsNullOrEmpty($account)) { throw (New-AgentException 'no-account' 'no Windows account is given for this user.') }
        $sidObject = Resolve-Account $account
        $sid = $sidObject.Value
        $item['sid'] = $sid
        # The canonical DOMAIN\name, as %USERNAME% and %USERDOMAIN% would give it at logon.
        $canonical = $account
        try { $canonical = $sidObject.Translate([System.Security.Principal.NTAccount]).Value } catch { $canonical = $account }
        $profilePath = Get-ProfilePath $sid
        if ([string]::IsNullOrEmpty($profilePath) -or -not [IO.Directory]::Exists($profilePath)) {
            throw (New-AgentException 'no-profile' ("{0} has no profile on this workstation (never logged on)." -f $account))
        }
        $profilePath = Get-FullPathSafe $profilePath
        $item['profile'] = $profilePath
        $hive = Read-UserHive $sid $profilePath $canonical
        $item['appdata'] = Get-RoamingAppData $hive $profilePath $canonical
        $allowed = @(Expand-AppDataRoots $Roots (Get-AccountVariables $sid $profilePath))
        $appData = Test-AppData $item['appdata'] $profilePath $allowed
        $item['appdata'] = $appData
        $perUser = $null -ne $Install.per_user
        $Install = Find-UserMicroSip $Install $hive $profilePath $appData
        # A per-user exe is read (its PE header) with its folders locked, as it was found.
        $exeLocks = $null
        if (Test-Within $Install.exe_path $profilePath) { $exeLocks = Lock-Folders $Install.exe_path $profilePath $null }
        try {
            $decided = Get-MicroSipMode $hive $Install.dir $Install.exe_path $sid
            # Each user's own exe for a per-user install; the machine's is in install.version.
            if ($perUser) { $item['exe_version'] = Get-ExeVersion $Install.exe_path }
        } finally { Unlock-Folders $exeLocks }
        $item['mode'] = $decided.mode; $item['mode_rule'] = $decided.rule; $item['mode_detail'] = $decided.detail
        if ($decided.mode -ne $Mode) {
            throw (New-AgentException 'mode-mismatch' ("MicroSIP runs {0} for this user (rule {1}: {2}); the inventory says {3}." -f $decided.mode, $decided.rule, $decided.detail, $Mode))
        }
        $iniName = [IO.Path]::GetFileNameWithoutExtension($Install.exe) + '.ini'
        if ($decided.mode -eq 'portable') { $path = [IO.Path]::Combine($Install.dir, $iniName) }
        else { $path = [IO.Path]::Combine($appData, 'MicroSIP', $iniName) }
        $item['path'] = $path
        $start = Get-CheckStart $path $sid $Roots
        Assert-OwnPath $path $sid
        # Gathered apart and added only once all is read: a user in error has no file fields.
        $file = ConvertTo-FileState (Read-CheckedFile $path $start)
        $readOnly = Test-ReadOnly $path
        $appliedBytes = Read-StateFile (Get-StateFolder $sid $iniName) 'applied'
        $legacy = $null -eq $appliedBytes
        if ($legacy) {
            $appliedBytes = Read-UserFile ([IO.Path]::Combine((Get-LegacyFolder $path), 'applied')) $start
        }
        $running = @(Get-OwnedProcessId $Context ([IO.Path]::GetFileName($Install.exe_path)) $sid).Count -gt 0
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['read_only'] = $readOnly
        $item['applied'] = ConvertTo-AppliedState $appliedBytes $legacy
        $item['running'] = $running
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

function Get-OverrideState($Install) {
    $item = [ordered]@{ path = $null }
    if ($null -ne $Install.per_user) {
        # No machine-wide folder: the enforced keys reach each user's file through the merge.
        $item['per_user'] = $true; $item['error'] = $null
        return $item
    }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $path = [IO.Path]::Combine($Install.dir, 'override.ini')
        $item['path'] = $path
        $file = ConvertTo-FileState (Read-CheckedFile $path (Get-CheckStart $path '' @()))
        $readOnly = Test-ReadOnly $path
        $applied = ConvertTo-AppliedState (Read-StateFile (Get-StateFolder '' 'override.ini') 'applied') $false
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['read_only'] = $readOnly
        $item['applied'] = $applied
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'inspect'
if ($null -ne $refusal) { return $refusal }

$freeBytes = $null
try { $freeBytes = [IO.DriveInfo]::new($env:SystemDrive).AvailableFreeSpace } catch { $freeBytes = $null }
$hostInfo = [ordered]@{
    computer = $env:COMPUTERNAME
    ps_version = $PSVersionTable.PSVersion.ToString()
    free_bytes = $freeBytes
    language_mode = [string]$ExecutionContext.SessionState.LanguageMode
}

$wanted = Get-Field $Request 'install'
$found = Find-MicroSip $wanted
$mode = [string](Get-Field $wanted 'mode')
if ([string]::IsNullOrEmpty($mode)) { $mode = 'installed' }
$roots = @(Get-Field $Request 'appdata_roots')
$installDir = $found.dir
if ($null -ne $found.per_user) { $installDir = $found.per_user }
$machineVersion = $null
if ($found.found -and $null -eq $found.per_user) { $machineVersion = Get-ExeVersion $found.exe_path }
$install = [ordered]@{ found = $found.found; dir = $installDir; exe_path = $found.exe_path; source = $found.source; per_user = ($null -ne $found.per_user); version = $machineVersion }
$context = @{ processes = $null }

$override = $null
if ([bool](Get-Field $Request 'override')) { $override = Get-OverrideState $found }

$users = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'users'
foreach ($user in @($requested)) {
    if ($null -ne $user) { $users.Add((Get-UserState $user $found $mode $roots $context)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one user.
return [ordered]@{
    protocol = 1; op = 'inspect'; ok = $true
    host = $hostInfo; install = $install; override = $override; users = $users.ToArray()
}
